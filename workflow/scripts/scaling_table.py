from eigenattn.config.settings import ScalingTable
from eigenattn.spectra.scaling import collect, length_fits, sample_saturation
from eigenattn.storage import logs
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
t = ScalingTable.from_params(snakemake.params.p)
table = collect(zip(snakemake.input.spectra, t.n, t.N))
fits = length_fits(table, t.length_N, t.bootstrap, t.seed)
saturation = sample_saturation(table, t.sample_length)
write_table(table, snakemake.output.table)
write_table(fits, snakemake.output.fits)
write_table(saturation, snakemake.output.saturation)
log.info("power law of k90 against n (medians):\n%s", fits[fits.scope == "medians"].to_string())
log.info(
    "saturated at the largest N:\n%s",
    saturation.groupby(["variant", "level"]).saturated.mean().to_string(),
)
