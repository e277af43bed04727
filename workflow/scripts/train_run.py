from pathlib import Path

from eigenattn.storage import logs
from eigenattn.config.validation import resolve_device
from eigenattn.spectra.stores import RowStats
from eigenattn.training.loop import run

log = logs.start(snakemake)
p = snakemake.params.p
w = snakemake.wildcards
stats = RowStats(snakemake.input.stats) if "stats" in snakemake.input.keys() else None
run(
    Path(snakemake.output.final).parent,
    mode=w.mode,
    variant=w.tvariant,
    s=int(w.s),
    seed=int(w.seed),
    tcfg=p["tcfg"],
    seq_len=p["seq_len"],
    tokenizer_dir=snakemake.input.tokenizer,
    windows=snakemake.input.windows,
    data_seed=p["data_seed"],
    stats=stats,
    init_dir=snakemake.input.get("init"),
    device=resolve_device(snakemake.config["training"]["device"], key="training.device"),
)
