import pandas as pd

from eigenattn.config.settings import Plans, Plugin
from eigenattn.reconstruction.plan_eval import run_plans
from eigenattn.spectra.stores import RowStats
from eigenattn.storage import logs
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
i, o = snakemake.input, snakemake.output
summary, heads, predictors, sequences = run_plans(
    i.model,
    RowStats(i.rows),
    pd.read_csv(i.recon),
    pd.read_csv(i.plugin),
    list(i.fit),
    list(i.heldout),
    Plans.from_params(snakemake.params.settings),
    Plugin.from_params(snakemake.params.plugin),
    device=snakemake.params.runtime.torch_device(),
    out_dir=o.plans,
    per_input=pd.read_csv(i.per_input),
    passages=i.passages,
    latency=pd.read_csv(i.latency[0]) if len(i.get("latency", [])) else None,
)
for df, path in ((heads, o.heads), (predictors, o.predictors), (sequences, o.sequences), (summary, o.summary)):
    write_table(df, path)
log.info("plans of %s:\n%s\n%s", summary.model.iloc[0], summary.to_string(), predictors.to_string())
