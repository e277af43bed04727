from eigenattn.storage import logs
from eigenattn.config.validation import expected_scores
from eigenattn.spectra.stores import run_rows
from eigenattn.spectra.scheduler import dask_scheduler

log = logs.start(snakemake)
p = snakemake.params.p
dask_cfg = snakemake.config["eigen"]
with dask_scheduler(dask_cfg["scheduler"], snakemake.threads, dask_cfg["slurm"]):
    run_rows(
        list(snakemake.input),
        snakemake.output.rows,
        p["view"],
        p["variants"],
        p["split_every"],
        halves_path=snakemake.output.halves,
        expect=expected_scores(snakemake.config, snakemake.wildcards, "fit"),
    )
log.info("wrote %s and %s", snakemake.output.rows, snakemake.output.halves)
