import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")
from eigenattn import logs
from eigenattn.train import build_windows

log = logs.start(snakemake)
p = snakemake.params
counts = build_windows(snakemake.input.tokenizer, snakemake.input.documents, p.seq_len, p.seed,
                       p.heldout_fraction, p.eval_sequences, snakemake.output[0])
log.info("windows of %d tokens: %s", p.seq_len, counts)
