from eigenattn.corpus.passages import build_documents
from eigenattn.storage import logs

log = logs.start(snakemake)
docs = build_documents(
    snakemake.wildcards.corpus,
    snakemake.params.spec,
    snakemake.output[0],
    cache_dir=snakemake.params.cache,
)
log.info("%d documents, %d words -> %s", len(docs), docs["n_words"].sum(), snakemake.output[0])
