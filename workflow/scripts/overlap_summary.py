from eigenattn.spectra.overlap import summarise
from eigenattn.storage import logs
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
table = summarise(snakemake.input.within, snakemake.input.cross)
write_table(table, snakemake.output[0])
log.info("%d summary rows -> %s", len(table), snakemake.output[0])
