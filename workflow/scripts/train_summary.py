from eigenattn.storage import logs
from eigenattn.storage.store import write_table
from eigenattn.training.summary import compare, summarise

log = logs.start(snakemake)
finals = list(snakemake.input.final)
for name, df in (
    ("summary", summarise(finals)),
    ("comparisons", compare(finals, keep=float(snakemake.params.keep))),
):
    write_table(df, snakemake.output[name])
    log.info("wrote %s:\n%s", snakemake.output[name], df.to_string())
