# The overlap stage's input, param and target functions (its rules: ../overlap.smk).


def overlap_within_outputs():
    return [
        path(rules.overlap_within.output[0], model=m, view=v, variant=variant)
        for m, v in model_view_pairs()
        for variant in EIGEN.variants
    ]


def overlap_cross_outputs():
    pairs = plan.cross_pairs(config)
    return [
        path(rules.overlap_cross.output[0], model_a=a, model_b=b, variant=v)
        for a, b in pairs
        for v in EIGEN.variants
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
    return settings.SubspaceOverlap.from_config(config, wildcards.variant).params()


def overlap_summary_inputs(wildcards):
    return {"within": overlap_within_outputs(), "cross": overlap_cross_outputs()}
