# The extract stage's input, param and target functions (its rules: ../extract.smk).


def streamed(model):
    """Whether a model's main run streams its statistics (extraction.store)."""
    return plan.store_mode(config, model) == "stream"


def score_shards(model, split):
    """The shards a stage reads a split's scores from: score stores, or in streamed mode token
    stores whose scores are recomputed from the model (eigenattn.capture.recompute)."""
    writer = rules.extract_tokens if streamed(model) else rules.extract_scores
    return expand(writer.output[0], model=model, split=split, shard=SHARDS)


def fit_shards(wildcards):
    return score_shards(wildcards.model, "fit")


def heldout_shards(wildcards):
    return score_shards(wildcards.model, "heldout")


def extraction_settings(wildcards):
    return settings.Extraction.from_config(
        config,
        wildcards.model,
        wildcards.split,
        int(wildcards.shard),
        len(SHARDS),
        SEQ_LEN,
    ).params()


def model_facts(wildcards):
    """What the config says of the model, checked against it after the probe. Passed
    as the object, so Snakemake does not record it (the settings hold layers, causal).
    """
    return settings.ModelFacts.from_config(config, wildcards.model)


def extract_outputs():
    return [p for m in MODELS for s in SPLITS for p in score_shards(m, s)]
