from eigenattn.config.settings import Spectrum
from eigenattn.spectra.stores import spectrum_table
from eigenattn.storage import logs
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
table = spectrum_table(
    snakemake.input.rows,
    snakemake.input.halves,
    snakemake.input.get("full"),
    Spectrum.from_params(snakemake.params.p).report_k,
)
write_table(table, snakemake.output[0])
log.info("%d spectrum rows -> %s", len(table), snakemake.output[0])
