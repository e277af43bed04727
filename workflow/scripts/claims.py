from eigenattn.claims.table import claims_table
from eigenattn.config.settings import ClaimThresholds
from eigenattn.storage import logs
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
i = snakemake.input
table = claims_table(
    list(i.spectra),
    i.overlap_summary,
    list(i.recon),
    list(i.plugin),
    i.training if "training" in i.keys() else None,
    ClaimThresholds.from_params(snakemake.params.settings),
    scaling=(list(i.scaling_fits), list(i.scaling_saturation), list(i.scaling_tables)),
    per_input=list(i.per_input),
    plans=list(i.plans) if "plans" in i.keys() else [],
    latency=list(i.get("latency", [])),
)
write_table(table, snakemake.output[0])
log.info("%d claim rows -> %s\n%s", len(table), snakemake.output[0], table.to_string())
