import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")
from eigenattn import logs
from eigenattn.eigen import run_rows
from eigenattn.scheduler import dask_scheduler

log = logs.start(snakemake)
p = snakemake.params.p
with dask_scheduler(p["scheduler"], snakemake.threads, p["slurm"]):
    run_rows(list(snakemake.input), snakemake.output[0], p["view"], p["variants"], p["split_every"])
log.info("wrote %s", snakemake.output[0])
