# The assets stage's input, param and target functions (its rules: ../assets.smk).


def model_spec(wildcards):
    return plan.recorded_spec(config, wildcards.model)


def model_source_files(wildcards):
    """A local model's files (source: path): editing them re-fetches the model."""
    return sources.model_files(plan.model_spec(config, wildcards.model))


def trained_model_dir():
    return path(rules.train_run.output.model, **plan.trained_run(config))


def model_dir(wildcards):
    """A fetched model's folder, or the trained encoder straight from its training run."""
    if wildcards.model == TRAINED:
        return trained_model_dir()
    return path(rules.fetch_model.output[0], model=wildcards.model)


def corpus_documents():
    return path(rules.fetch_corpus.output[0], corpus=CORPUS)


def passages():
    return path(rules.sample_passages.output[0], corpus=CORPUS)


def sampling_settings(wildcards):
    return settings.Sampling.from_config(config).params()
