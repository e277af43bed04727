import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")
from eigenattn import logs
from eigenattn.extract import extract_scores, shard_passages

log = logs.start(snakemake)
p = snakemake.params.p
passages = shard_passages(snakemake.input.passages[0], p["split"], p["shard"], p["n_shards"])
stats = extract_scores(
    snakemake.input.model,
    passages["text"].tolist(),
    passages["passage_id"].to_numpy(),
    snakemake.output[0],
    seq_len=p["seq_len"],
    dtype=p["dtype"],
    batch_size=p["batch_size"],
    device=p["device"],
    autocast=p["autocast"],
    layers=p["layers"],
    expect_causal=p["source"].get("causal"),
    compression=p["compression"],
    attrs={
        "model": p["model"],
        "source": p["source"],
        "corpus": p["corpus"],
        "split": p["split"],
        "seed": p["seed"],
        "shard": p["shard"],
        "n_shards": p["n_shards"],
    },
)
log.info("done: %s", stats)
