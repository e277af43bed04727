# The eigen stage's input, param and target functions (its rules: ../eigen.smk).


def expected_fit_scores(wildcards):
    n = int(wildcards.n) if "n" in wildcards.keys() else None
    return settings.expected_scores(config, wildcards.model, "fit", n)


def gram_mem_mb(wildcards, input, threads, attempt):
    """Peak memory of a full-matrix job, from the score stores' shapes once they exist
    (eigenattn.spectra.full_plan.stores_memory_mb, a generous guess before)."""
    from eigenattn.spectra.full_plan import stores_memory_mb

    e = config["eigen"]
    mb = stores_memory_mb(
        list(input),
        wildcards.view,
        bool(plan.model_spec(config, wildcards.model).get("causal")),
        e["gram_memory_mb"],
        threads,
        e["full_route"],
        rank=e["full_rank"],
        guess_n_sequences=int(
            getattr(wildcards, "N", 4 * config["sampling"]["n_sequences"]["fit"])
        ),
        guess_seq_len=int(getattr(wildcards, "n", SEQ_LEN)),
    )
    return int(attempt * mb)


def model_view_pairs():
    return [(m, v) for m in MODELS for v in plan.model_views(config, m)]


def eigen_outputs():
    return [
        path(rules.eigen_spectrum.output[0], model=m, view=v)
        for m, v in model_view_pairs()
    ]


def eigen_dirs():
    return [str(Path(p).parent) for p in eigen_outputs()]
