from eigenattn.storage import logs
from eigenattn.config.validation import expected_scores
from eigenattn.reconstruction.evaluate import evaluate_view
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
p = snakemake.params.p
df = evaluate_view(
    snakemake.input.rows,
    list(snakemake.input.heldout),
    estimators=p["estimators"],
    strategies=p["strategies"],
    subset_sizes=p["subset_sizes"],
    ridge=p["ridge"],
    rank=p["eigenspace_rank"],
    seed=p["seed"],
    fit_shards=list(snakemake.input.fit),
    expect=expected_scores(snakemake.config, snakemake.wildcards, "heldout"),
    eval_rows=p["eval_rows"],
    transfer=p["transfer"],
    transfer_estimators=p["transfer_estimators"],
    other_stores=dict(zip(p["other_models"], snakemake.input.others)),
)
write_table(df, snakemake.output[0])
same = df[(df.basis_source == "same") & (df.split == "heldout")]
log.info("median over heads:\n%s", same.groupby(["estimator", "strategy", "subset_size"])[
    ["rel_error", "tv", "top1"]].median().to_string())
log.info("wrote %s (%d rows)", snakemake.output[0], len(df))
