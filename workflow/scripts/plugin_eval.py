from eigenattn.config.settings import Plugin
from eigenattn.reconstruction.plugin import plugin_eval
from eigenattn.storage import logs
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
sequences = []
df = plugin_eval(
    snakemake.input.model,
    snakemake.input.rows,
    list(snakemake.input.heldout),
    Plugin.from_params(snakemake.params.settings),
    device=snakemake.params.runtime.torch_device(),
    passages=snakemake.input.passages,
    workers=snakemake.threads,
    sequences=sequences,
)
write_table(sequences[0], snakemake.output.sequences)
write_table(df, snakemake.output.table)
log.info("wrote %s:\n%s", snakemake.output.table, df.to_string())
