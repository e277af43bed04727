from eigenattn.storage import logs
from eigenattn.training.data import build_windows

log = logs.start(snakemake)
p = snakemake.params
counts = build_windows(
    snakemake.input.tokenizer,
    snakemake.input.documents,
    p.seq_len,
    p.seed,
    p.heldout_fraction,
    p.eval_sequences,
    snakemake.output[0],
)
log.info("windows of %d tokens: %s", p.seq_len, counts)
