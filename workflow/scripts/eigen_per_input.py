from eigenattn.config.settings import PerInput
from eigenattn.spectra.per_input import per_input_spectrum, per_input_tables
from eigenattn.storage import logs
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
p = snakemake.params
split = PerInput.from_params(p.settings).split
result = per_input_spectrum(list(snakemake.input), p.view, expect=p.expect)
curves, summary = per_input_tables(result)
write_table(curves, snakemake.output.curves)
write_table(summary, snakemake.output.summary)
log.info(
    "per-input spectrum of %s/%s over %d %s inputs: value at index %d (d = %d), median over heads %.3f -> %s, %s",
    result["attrs"]["model"],
    p.view,
    int(result["n_inputs"].max()),
    split,
    result["quarter_index"],
    result["d"],
    float(summary.value_at_quarter.median()),
    snakemake.output.curves,
    snakemake.output.summary,
)
