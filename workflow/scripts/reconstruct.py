from eigenattn.config.settings import Reconstruction
from eigenattn.reconstruction.evaluate import evaluate_view
from eigenattn.storage import logs
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
settings = Reconstruction.from_params(snakemake.params.settings)
df = evaluate_view(
    snakemake.input.rows,
    list(snakemake.input.heldout),
    settings,
    fit_shards=list(snakemake.input.fit),
    other_stores=dict(zip(settings.other_models, snakemake.input.others)),
    expect=snakemake.params.expect,
    workers=snakemake.threads,
)
write_table(df, snakemake.output[0])
same = df[(df.basis_source == "same") & (df.split == "heldout")]
log.info(
    "median over heads:\n%s",
    same.groupby(["estimator", "strategy", "subset_size"])[["rel_error", "tv", "top1"]].median().to_string(),
)
log.info("wrote %s (%d rows)", snakemake.output[0], len(df))
