from eigenattn.storage import logs
from eigenattn.config.validation import check_model_facts, resolve_device
from eigenattn.capture.extract import extract_scores, shard_passages

log = logs.start(snakemake)
p = snakemake.params.p
passages = shard_passages(snakemake.input.passages, p["split"], p["shard"], p["n_shards"])
stats = extract_scores(
    snakemake.input.model,
    passages["text"].tolist(),
    passages["passage_id"].to_numpy(),
    snakemake.output[0],
    seq_len=p["seq_len"],
    dtype=p["dtype"],
    batch_size=p["batch_size"],
    chunk_sequences=p["chunk_sequences"],
    device=resolve_device(snakemake.config["extraction"]["device"], key="extraction.device"),
    autocast=p["autocast"],
    layers=p["layers"],
    compression=p["compression"],
    check_facts=lambda facts: check_model_facts(snakemake.config, p["model"], facts),
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
