from eigenattn.config.settings import Plugin
from eigenattn.reconstruction.plugin import plugin_eval
from eigenattn.storage import logs
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
df = plugin_eval(
    snakemake.input.model,
    snakemake.input.rows,
    list(snakemake.input.heldout),
    Plugin.from_params(snakemake.params.settings),
    device=snakemake.params.runtime.torch_device(),
    workers=snakemake.threads,
)
write_table(df, snakemake.output[0])
log.info("wrote %s:\n%s", snakemake.output[0], df.to_string())
