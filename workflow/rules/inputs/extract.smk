# The extract stage's input, param and target functions (its rules: ../extract.smk).


def score_shards(model, split):
    return expand(
        rules.extract_scores.output[0], model=model, split=split, shard=SHARDS
    )


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
