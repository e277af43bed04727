# Stage 4: subspace overlap within each model and across model pairs.


include: "inputs/overlap.smk"


rule overlap_within:
    """Overlap of top-k eigenspaces across one model's heads and layers."""
    input:
        rows=rules.eigen_rows.output.rows,
        halves=rules.eigen_rows.output.halves,
    output:
        directory("results/overlap/{model}/{view}/{variant}.zarr"),
    log:
        "logs/overlap_within/{model}/{view}/{variant}.log",
    benchmark:
        "benchmarks/out/overlap_within/{model}/{view}/{variant}.tsv"
    conda:
        "../../envs/eigenattn.yaml"
    threads: job_threads
    params:
        p=overlap_params,
    script:
        "../scripts/overlap_within.py"


rule overlap_cross:
    """Overlap of the prefix view's top-k eigenspaces between two models."""
    input:
        unpack(cross_inputs),
    output:
        directory("results/overlap/cross/{model_a}__{model_b}/prefix/{variant}.zarr"),
    log:
        "logs/overlap_cross/{model_a}__{model_b}/{variant}.log",
    benchmark:
        "benchmarks/out/overlap_cross/{model_a}__{model_b}/{variant}.tsv"
    conda:
        "../../envs/eigenattn.yaml"
    threads: job_threads
    params:
        p=overlap_params,
    script:
        "../scripts/overlap_cross.py"


rule overlap_summary:
    """One table of the overlap and captured variance of every store."""
    input:
        unpack(overlap_summary_inputs),
    output:
        "results/overlap/summary.csv",
    log:
        "logs/overlap_summary.log",
    conda:
        "../../envs/eigenattn.yaml"
    script:
        "../scripts/overlap_summary.py"


rule overlap:
    """Stage 4: the subspace-overlap summary."""
    input:
        rules.overlap_summary.output[0],
