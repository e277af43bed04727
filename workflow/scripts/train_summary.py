from eigenattn.storage import logs
from eigenattn.storage.store import write_table
from eigenattn.training.summary import summarise

log = logs.start(snakemake)
df = summarise(list(snakemake.input))
write_table(df, snakemake.output[0])
log.info("wrote %s:\n%s", snakemake.output[0], df.to_string())
