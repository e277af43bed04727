from eigenattn.spectra.scheduler import dask_scheduler
from eigenattn.spectra.stores import run_full
from eigenattn.storage import logs

log = logs.start(snakemake)
p, runtime = snakemake.params, snakemake.params.runtime
# the cores no other job of this run holds, when it runs alone (a stage re-run on its own)
workers = runtime.threads_now(snakemake.threads)
if workers != snakemake.threads:
    log.info(
        "%d of the run's %s cores are free: %d workers instead of %d",
        workers,
        runtime.cores,
        workers,
        snakemake.threads,
    )
with dask_scheduler(runtime.scheduler, workers, runtime.slurm):
    res = run_full(
        list(snakemake.input),
        snakemake.output[0],
        p.view,
        p.variants,
        runtime.memory_mb,
        expect=p.expect,
        workers=workers,
        route=runtime.route,
        rank=p.rank,
        seed=p.seed,
    )
first = next(iter(res.values()))
log.info(
    "wrote %s (route %s, N = %d, D = %d)",
    snakemake.output[0],
    first["route"],
    first["n_samples"],
    first["dim"],
)
