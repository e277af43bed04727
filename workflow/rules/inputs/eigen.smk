# The eigen stage's input, param and target functions (its rules: ../eigen.smk).


def expected_fit_scores(wildcards):
    n = int(wildcards.n) if "n" in wildcards.keys() else None
    return settings.expected_scores(config, wildcards.model, "fit", n)


def per_input_shards(wildcards):
    """The score shards of the split the per-input spectrum reads (eigen.per_input_split)."""
    return score_shards(wildcards.model, settings.PerInput.from_config(config).split)


def expected_per_input_scores(wildcards):
    split = settings.PerInput.from_config(config).split
    return settings.expected_scores(config, wildcards.model, split)


def gram_mem_mb(wildcards, input, threads, attempt):
    """Peak memory of a full-matrix job, from the score stores' shapes once they exist
    (eigenattn.spectra.full_plan.stores_memory_mb, a generous guess before)."""
    from eigenattn.spectra.full_plan import stores_memory_mb

    where = runtime("eigen")
    mb = stores_memory_mb(
        list(input),
        wildcards.view,
        bool(plan.model_spec(config, wildcards.model).get("causal")),
        where.memory_mb,
        threads,
        where.route,
        rank=EIGEN.full_rank,
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


def per_input_outputs(*names):
    """The per-input spectrum's tables of every model and view: ``names`` of the rule's outputs
    (``curves``, ``summary``; both when none is given)."""
    return [
        path(rules.eigen_per_input.output[name], model=m, view=v)
        for m, v in model_view_pairs()
        for name in names or ("curves", "summary")
    ]
