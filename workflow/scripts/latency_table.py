"""The latency table of one model's view: every method's real kernel at each s on the view (exact
elsewhere), as a share of SDPA's time at the model's head shapes and the run's n, on this device
(docs/method.md §15; the data contract's results/latency/)."""

import json
import warnings
from pathlib import Path

from eigenattn.reconstruction import clock
from eigenattn.spectra.stores import RowStats
from eigenattn.storage import logs
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
# eager FlexAttention on a CPU (it materialises its scores) is what is timed there: no warning per call
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
settings = snakemake.params.settings  # subset_sizes, sinks, q_last, pinv, seed
runtime = snakemake.params.runtime
stats = RowStats(snakemake.input.rows)
cfg = json.loads((Path(snakemake.input.model) / "config.json").read_text())
cfg = cfg.get("text_config", cfg)
heads = int(cfg["num_attention_heads"])
d_head = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
device = runtime.torch_device()
compiled = device.type == "cuda"  # torch.compile's C++ build of every shape costs more than it measures on a CPU
table = clock.view_latency_table(
    stats.seq_len,
    settings["subset_sizes"],
    query_range=stats.query_range,
    key_range=stats.key_range,
    causal=stats.causal,
    d_head=d_head,
    heads=heads,
    threads=snakemake.threads,
    device=str(device),
    repeats=snakemake.params.repeats,
    compiled=compiled,
    sinks=settings["sinks"],
    q_last=settings["q_last"],
    pinvs=settings["pinv"] or ("iterative",),
    seed=settings["seed"],
)
table = table.assign(model=stats.model, view=stats.view, device_key=snakemake.params.device_key)
write_table(table, snakemake.output[0])
log.info(
    "latency at n = %d on %s (%s):\n%s",
    stats.seq_len,
    table.device.iloc[0] if len(table) else device,
    "overhead-bound: a reference only" if stats.seq_len < clock.OVERHEAD_N else "measured",
    table[["method", "strategy", "s", "time_share", "compile_s"]].to_string(index=False),
)
