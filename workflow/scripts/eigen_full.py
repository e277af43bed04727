from eigenattn.spectra.scheduler import dask_scheduler
from eigenattn.spectra.stores import run_full
from eigenattn.storage import logs

log = logs.start(snakemake)
p, runtime = snakemake.params, snakemake.params.runtime
with dask_scheduler(runtime.scheduler, snakemake.threads, runtime.slurm):
    res = run_full(
        list(snakemake.input),
        snakemake.output[0],
        p.view,
        p.variants,
        runtime.memory_mb,
        expect=p.expect,
        workers=snakemake.threads,
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
