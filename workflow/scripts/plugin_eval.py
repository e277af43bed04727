from eigenattn.storage import logs
from eigenattn.config.validation import resolve_device
from eigenattn.reconstruction.plugin import plugin_eval
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
p = snakemake.params.p
df = plugin_eval(
    snakemake.input.model,
    snakemake.input.rows,
    list(snakemake.input.heldout),
    estimators=p["estimators"],
    strategies=p["strategies"],
    subset_sizes=p["subset_sizes"],
    n_sequences=p["n_sequences"],
    batch_size=p["batch_size"],
    ridge=p["ridge"],
    rank=p["eigenspace_rank"],
    seed=p["seed"],
    device=resolve_device(snakemake.config["plugin"]["device"], key="plugin.device"),
)
write_table(df, snakemake.output[0])
log.info("wrote %s:\n%s", snakemake.output[0], df.to_string())
