rule extract_scores:
    input:
        model="resources/models/{model}",
        passages=expand("results/corpus/{corpus}/passages.parquet", corpus=CORPUS),
    output:
        directory("results/scores/{model}/{split}/shard-{shard}.zarr"),
    log:
        "logs/extract/{model}/{split}/shard-{shard}.log",
    benchmark:
        "benchmarks/out/extract/{model}/{split}/shard-{shard}.tsv"
    conda:
        "../../envs/eigenattn.yaml"
    threads: 2
    resources:
        mem_mb=extract_mem_mb,
        gpu=extract_gpus,
    params:
        p=extract_params,
    script:
        "../scripts/extract_scores.py"


rule extract:
    input:
        extract_outputs(),
