from eigenattn.storage import logs
from eigenattn.config.validation import expected_scores
from eigenattn.spectra.stores import run_full
from eigenattn.spectra.scheduler import dask_scheduler

log = logs.start(snakemake)
p = snakemake.params.p
dask_cfg = snakemake.config["eigen"]
with dask_scheduler(dask_cfg["scheduler"], snakemake.threads, dask_cfg["slurm"]):
    res = run_full(
        list(snakemake.input),
        snakemake.output[0],
        p["view"],
        p["variants"],
        dask_cfg["gram_memory_mb"],
        expect=expected_scores(snakemake.config, snakemake.wildcards, "fit"),
        workers=snakemake.threads,
        route=dask_cfg["full_route"],
        rank=p["rank"],
        seed=p["seed"],
    )
first = next(iter(res.values()))
log.info(
    "wrote %s (route %s, N = %d, D = %d)",
    snakemake.output[0],
    first["route"],
    first["n_samples"],
    first["dim"],
)
