from eigenattn.spectra.scaling import collect, length_fits, sample_saturation
from eigenattn.storage import logs
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
p = snakemake.params.p
table = collect(zip(snakemake.input.spectra, p["n"], p["N"]))
fits = length_fits(table, p["length_N"], p["bootstrap"], p["seed"])
saturation = sample_saturation(table, p["sample_length"])
write_table(table, snakemake.output.table)
write_table(fits, snakemake.output.fits)
write_table(saturation, snakemake.output.saturation)
log.info("power law of k90 against n (medians):\n%s", fits[fits.scope == "medians"].to_string())
log.info(
    "saturated at the largest N:\n%s",
    saturation.groupby(["variant", "level"]).saturated.mean().to_string(),
)
