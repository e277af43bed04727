# The eigen stage's input, param and target functions (its rules: ../eigen.smk).


def expected_fit_scores(wildcards):
    n = int(wildcards.n) if "n" in wildcards.keys() else None
    return settings.expected_scores(config, wildcards.model, "fit", n)


def row_inputs(wildcards):
    """What the row spectra of a model are made from: its fit score shards, or in streamed mode
    the moments of every layer group and shard (the scaling study always stores its scores).
    """
    if not rows_streamed(wildcards):
        return fit_shards(wildcards)
    return expand(
        rules.stream_moments.output[0],
        model=wildcards.model,
        group=range(plan.layer_groups(config, wildcards.model)),
        shard=SHARDS,
    )


def rows_streamed(wildcards):
    """Whether these row spectra come from streamed moments (main run or scaling grid point)."""
    if "n" in wildcards.keys():
        return scaling_streamed(wildcards)
    return streamed(wildcards.model)


def stream_settings(wildcards):
    """One streamed-moments job: the fit shard's extraction settings, its layer group, the views
    (the variants follow from the raw moments), and where its sequences sit in the fit split.
    """
    return {
        "extraction": settings.Extraction.from_config(
            config, wildcards.model, "fit", int(wildcards.shard), len(SHARDS), SEQ_LEN
        ).params(),
        "group": int(wildcards.group),
        "n_groups": plan.layer_groups(config, wildcards.model),
        "views": plan.model_views(config, wildcards.model),
        "first_index": plan.shard_first(config, "fit", int(wildcards.shard)),
        "split_sequence": plan.fit_halves_split(config),
    }


def stream_mem_mb(wildcards, attempt):
    """The job's moments (extraction.stream_memory_gb at most) plus the model and one batch's scores."""
    gb = float(config["extraction"].get("stream_memory_gb", 4))
    return int(attempt * (4000 + 1000 * gb))


def spectrum_inputs(wildcards):
    """The row and half spectra, and the full-matrix spectra except in streamed mode: there N ≪ D,
    and recomputing every sequence for each head group of every pass costs many forward passes,
    so the claims table has a reference row instead (docs/method.md §14)."""
    ins = {
        "rows": path(
            rules.eigen_rows.output.rows, model=wildcards.model, view=wildcards.view
        ),
        "halves": path(
            rules.eigen_rows.output.halves, model=wildcards.model, view=wildcards.view
        ),
    }
    if not streamed(wildcards.model):
        ins["full"] = path(
            rules.eigen_full.output[0], model=wildcards.model, view=wildcards.view
        )
    return ins


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
