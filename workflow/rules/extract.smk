# Stage 2: attention scores, one store per model, split and shard.


include: "inputs/extract.smk"


rule extract_scores:
    """Store one shard of a model's pre-softmax scores, once the probe accepts it."""
    input:
        model=model_dir,
        passages=passages(),
    output:
        directory("results/scores/{model}/{split}/shard-{shard}.zarr"),
    log:
        "logs/extract/{model}/{split}/shard-{shard}.log",
    benchmark:
        "benchmarks/out/extract/{model}/{split}/shard-{shard}.tsv"
    # the main run's longest chain (extraction, row spectra, reconstruction, plug-in) starts before
    # ready training runs and the scaling grid (whose copies of these rules set priority 0)
    priority: 10
    conda:
        "../../envs/eigenattn.yaml"
    threads: job_threads
    resources:
        mem_mb=mem_mb(4000),
        gpu=gpus_for("extraction"),
    params:
        settings=extraction_settings,
        facts=model_facts,
        runtime=runtime("extraction"),
    script:
        "../scripts/extract_scores.py"


rule extract_tokens:
    """Streamed mode: one shard's tokens, once the probe accepts the model; readers recompute its scores."""
    input:
        model=model_dir,
        passages=passages(),
    output:
        directory("results/tokens/{model}/{split}/shard-{shard}.zarr"),
    log:
        "logs/extract_tokens/{model}/{split}/shard-{shard}.log",
    benchmark:
        "benchmarks/out/extract_tokens/{model}/{split}/shard-{shard}.tsv"
    conda:
        "../../envs/eigenattn.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
    params:
        settings=extraction_settings,
        facts=model_facts,
    script:
        "../scripts/extract_tokens.py"


rule extract:
    """Stage 2: every model's score stores (token stores where streamed), all splits and shards."""
    input:
        extract_outputs(),
