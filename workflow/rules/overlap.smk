# Stage 4: subspace overlap within each model and across model pairs.


def overlap_within_outputs():
    return [
        path(rules.overlap_within.output[0], model=m, view=v, variant=variant)
        for m, v in model_view_pairs()
        for variant in config["eigen"]["variants"]
    ]


def overlap_cross_outputs():
    pairs = plan.cross_pairs(config)
    variants = config["eigen"]["variants"]
    return [
        path(rules.overlap_cross.output[0], model_a=a, model_b=b, variant=v)
        for a, b in pairs
        for v in variants
    ]


def cross_inputs(wildcards):
    rows, halves = rules.eigen_rows.output.rows, rules.eigen_rows.output.halves
    return {
        f"{side}{suffix}": path(
            pattern, model=getattr(wildcards, f"model_{side}"), view="prefix"
        )
        for side in ("a", "b")
        for suffix, pattern in (("", rows), ("_halves", halves))
    }


def overlap_params(wildcards):
    return {"k": config["overlap"]["k"], "variant": wildcards.variant}


def overlap_summary_inputs(wildcards):
    return {"within": overlap_within_outputs(), "cross": overlap_cross_outputs()}


rule overlap_within:
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
    threads: 2
    params:
        p=overlap_params,
    script:
        "../scripts/overlap_within.py"


rule overlap_cross:
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
    threads: 2
    params:
        p=overlap_params,
    script:
        "../scripts/overlap_cross.py"


rule overlap_summary:
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
    input:
        rules.overlap_summary.output[0],
