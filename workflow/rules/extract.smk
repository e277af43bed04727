# Stage 2: attention scores, one store per model, split and shard.


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


def extract_outputs():
    return [p for m in MODELS for s in SPLITS for p in score_shards(m, s)]


rule extract_scores:
    input:
        model=model_dir,
        passages=passages(),
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
        mem_mb=mem_mb(4000),
        gpu=gpus_for("extraction"),
    params:
        settings=extraction_settings,
        runtime=runtime("extraction"),
    script:
        "../scripts/extract_scores.py"


rule extract:
    input:
        extract_outputs(),
