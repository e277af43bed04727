rule fetch_model:
    input:
        model_source_input,
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
        mem_mb=lambda wildcards, attempt: 6000 * attempt,
    params:
        spec=model_spec,
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
        spec=corpus_spec,
    script:
        "../scripts/fetch_corpus.py"


rule sample_passages:
    input:
        "resources/corpora/{corpus}/documents.parquet",
    output:
        "results/corpus/{corpus}/passages.parquet",
    log:
        "logs/sample_passages/{corpus}.log",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        sampling=sampling_params,
    script:
        "../scripts/sample_passages.py"


rule corpus:
    input:
        expand("results/corpus/{corpus}/passages.parquet", corpus=CORPUS),
