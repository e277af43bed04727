from eigenattn.capture.extract import extract_scores, shard_passages
from eigenattn.config.settings import Extraction
from eigenattn.config.validation import check_model_facts, check_store_room
from eigenattn.storage import logs

log = logs.start(snakemake)
e = Extraction.from_params(snakemake.params.settings)
passages = shard_passages(snakemake.input.passages, e.split, e.shard, e.n_shards)
stats = extract_scores(
    snakemake.input.model,
    passages["text"].tolist(),
    passages["passage_id"].to_numpy(),
    snakemake.output[0],
    seq_len=e.seq_len,
    dtype=e.dtype,
    batch_size=e.batch_size,
    chunk_sequences=e.chunk_sequences,
    device=snakemake.params.runtime.torch_device(),
    autocast=e.autocast,
    layers=e.layers,
    compression=e.compression,
    check_facts=lambda facts: check_model_facts(snakemake.params.facts, facts),
    check_size=lambda nbytes: check_store_room(e.model, snakemake.output[0], nbytes),
    attrs=e.attrs(),
)
log.info("done: %s", stats)
