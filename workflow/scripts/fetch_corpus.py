import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")
from eigenattn import logs
from eigenattn.corpus import build_documents

log = logs.start(snakemake)
docs = build_documents(
    snakemake.wildcards.corpus,
    snakemake.params.spec,
    snakemake.output[0],
    cache_dir="resources/wheels",
)
log.info("%d documents, %d words -> %s", len(docs), docs["n_words"].sum(), snakemake.output[0])
