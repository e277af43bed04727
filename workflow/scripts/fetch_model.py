from eigenattn.storage import logs
from eigenattn.storage.assets import materialise_model

log = logs.start(snakemake)
materialise_model(
    snakemake.wildcards.model,
    snakemake.params.spec,
    snakemake.output[0],
    cache_dir=snakemake.params.cache,
)
log.info("model ready at %s", snakemake.output[0])
