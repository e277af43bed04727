from eigenattn.spectra.scheduler import dask_scheduler
from eigenattn.spectra.stores import run_rows, run_rows_streamed
from eigenattn.storage import logs

log = logs.start(snakemake)
p, runtime = snakemake.params, snakemake.params.runtime
if p.streamed:  # merged moments of every layer group and shard (extraction.store: stream)
    run_rows_streamed(
        list(snakemake.input),
        snakemake.output.rows,
        p.view,
        p.variants,
        snakemake.output.halves,
        expect=p.expect,
        vectors=p.vectors,
    )
else:
    with dask_scheduler(runtime.scheduler, snakemake.threads, runtime.slurm):
        run_rows(
            list(snakemake.input),
            snakemake.output.rows,
            p.view,
            p.variants,
            p.split_every,
            halves_path=snakemake.output.halves,
            expect=p.expect,
            vectors=p.vectors,
        )
log.info("wrote %s and %s", snakemake.output.rows, snakemake.output.halves)
