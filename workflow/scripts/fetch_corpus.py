from eigenattn.storage import logs
from eigenattn.corpus.passages import build_documents

log = logs.start(snakemake)
docs = build_documents(
    snakemake.wildcards.corpus,
    snakemake.params.spec,
    snakemake.output[0],
    cache_dir=snakemake.params.cache,
)
log.info("%d documents, %d words -> %s", len(docs), docs["n_words"].sum(), snakemake.output[0])
