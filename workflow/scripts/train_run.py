from pathlib import Path

from eigenattn.config.settings import Training
from eigenattn.spectra.stores import RowStats
from eigenattn.storage import logs
from eigenattn.training.loop import run

log = logs.start(snakemake)
w = snakemake.wildcards
stats = RowStats(snakemake.input.stats) if "stats" in snakemake.input.keys() else None
run(
    Path(snakemake.output.final).parent,
    mode=w.mode,
    variant=w.tvariant,
    s=int(w.s),
    seed=int(w.seed),
    settings=Training.from_params(snakemake.params.settings),
    tokenizer_dir=snakemake.input.tokenizer,
    windows=snakemake.input.windows,
    stats=stats,
    init_dir=snakemake.input.get("init"),
    device=snakemake.params.runtime.torch_device(),
)
