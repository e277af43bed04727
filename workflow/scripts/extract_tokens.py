from eigenattn.capture.extract import shard_passages
from eigenattn.capture.recompute import extract_tokens
from eigenattn.config.settings import Extraction
from eigenattn.config.validation import check_model_facts
from eigenattn.storage import logs

log = logs.start(snakemake)
e = Extraction.from_params(snakemake.params.settings)
passages = shard_passages(snakemake.input.passages, e.split, e.shard, e.n_shards)
stats = extract_tokens(
    snakemake.input.model,
    passages["text"].tolist(),
    passages["passage_id"].to_numpy(),
    snakemake.output[0],
    seq_len=e.seq_len,
    layers=e.layers,
    chunk_sequences=e.chunk_sequences,
    dtype_requested=e.dtype,
    device="cpu",
    autocast=e.autocast,
    check_facts=lambda facts: check_model_facts(snakemake.params.facts, facts),
    attrs=e.attrs(),
)
log.info("done: %s", stats)
