from eigenattn.capture.extract import shard_passages
from eigenattn.config.settings import Extraction
from eigenattn.config.validation import check_model_facts
from eigenattn.spectra.streamed import stream_moments
from eigenattn.storage import logs

log = logs.start(snakemake)
p = snakemake.params.settings
e = Extraction.from_params(p["extraction"])
passages = shard_passages(snakemake.input.passages, e.split, e.shard, e.n_shards)
stats = stream_moments(
    snakemake.input.model,
    passages["text"].tolist(),
    passages["passage_id"].to_numpy(),
    snakemake.output[0],
    seq_len=e.seq_len,
    layers=e.layers,
    group=p["group"],
    n_groups=p["n_groups"],
    views=p["views"],
    first_index=p["first_index"],
    split_sequence=p["split_sequence"],
    batch_size=e.batch_size,
    device=snakemake.params.runtime.torch_device(),
    autocast=e.autocast,
    stream_memory_gb=p.get("stream_memory_gb"),  # the group must fit it (checked before the first pass)
    check_facts=lambda facts: check_model_facts(snakemake.params.facts, facts),
    attrs=e.attrs(),
)
log.info("done: %s", stats)
