rule fetch_model:
    output:
        directory("resources/models/{model}"),
    params:
        spec=model_spec,
    log:
        "logs/fetch_model/{model}.log",
    benchmark:
        "benchmarks/out/fetch_model/{model}.tsv"
    conda:
        "../../envs/eigenattn.yaml"
    threads: 2
    resources:
        mem_mb=lambda wildcards, attempt: 6000 * attempt,
    script:
        "../scripts/fetch_model.py"


rule fetch_corpus:
    output:
        "resources/corpora/{corpus}/documents.parquet",
    params:
        spec=corpus_spec,
    log:
        "logs/fetch_corpus/{corpus}.log",
    benchmark:
        "benchmarks/out/fetch_corpus/{corpus}.tsv"
    conda:
        "../../envs/eigenattn.yaml"
    script:
        "../scripts/fetch_corpus.py"


rule sample_passages:
    input:
        "resources/corpora/{corpus}/documents.parquet",
    output:
        "results/corpus/{corpus}/passages.parquet",
    params:
        sampling=sampling_params,
    log:
        "logs/sample_passages/{corpus}.log",
    conda:
        "../../envs/eigenattn.yaml"
    script:
        "../scripts/sample_passages.py"


rule corpus:
    input:
        expand("results/corpus/{corpus}/passages.parquet", corpus=CORPUS),
