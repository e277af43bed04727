from eigenattn import logs
from eigenattn.config import expected_scores
from eigenattn.eigen_stores import run_full
from eigenattn.scheduler import dask_scheduler

log = logs.start(snakemake)
p = snakemake.params.p
dask_cfg = snakemake.config["eigen"]
with dask_scheduler(dask_cfg["scheduler"], snakemake.threads, dask_cfg["slurm"]):
    run_full(
        list(snakemake.input),
        snakemake.output[0],
        p["view"],
        p["variants"],
        dask_cfg["gram_memory_mb"],
        expect=expected_scores(snakemake.config, snakemake.wildcards, "fit"),
    )
log.info("wrote %s", snakemake.output[0])
