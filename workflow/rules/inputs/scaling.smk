# The scaling stage's input, param and target functions (its rules: ../scaling.smk).


def scaling_sampling_settings(wildcards):
    return settings.Sampling.scaling_point(config, wildcards.n, wildcards.N).params()


def scaling_passages(wildcards):
    return path(
        rules.scaling_sample_passages.output[0],
        corpus=CORPUS,
        n=wildcards.n,
        N=wildcards.N,
    )


def scaling_extraction_settings(wildcards):
    """A grid point's extraction: at most scaling.max_layers layers, and chunks small enough that
    even a small N has two halves (a batch is whole chunks)."""
    chunk, batch = plan.scaling_chunking(config, wildcards.N)
    return settings.Extraction.from_config(
        config,
        wildcards.model,
        "fit",
        0,
        1,
        int(wildcards.n),
        layers=plan.scaling_layers(config, wildcards.model),
        chunk=chunk,
        batch=batch,
    ).params()


def scaling_streamed(wildcards):
    """Whether a grid point's statistics are streamed (extraction.store; docs/method.md §14)."""
    return plan.scaling_point_streamed(
        config, wildcards.model, int(wildcards.n), int(wildcards.N)
    )


def scaling_row_inputs(wildcards):
    """A grid point's score store, or its streamed moments (one store per layer group)."""
    where = {"model": wildcards.model, "n": wildcards.n, "N": wildcards.N}
    if not scaling_streamed(wildcards):
        return path(rules.scaling_extract_scores.output[0], **where)
    groups = plan.layer_groups(
        config,
        wildcards.model,
        int(wildcards.n),
        plan.scaling_layers(config, wildcards.model),
    )
    return expand(rules.scaling_stream_moments.output[0], group=range(groups), **where)


def scaling_stream_settings(wildcards):
    """A streamed grid point's job: its extraction settings (one shard), layer group, views and
    variants, and where its halves split."""
    n, N = int(wildcards.n), int(wildcards.N)
    chunk, _ = plan.scaling_chunking(config, N)
    layers = plan.scaling_layers(config, wildcards.model)
    return {
        "extraction": scaling_extraction_settings(wildcards),
        "group": int(wildcards.group),
        "n_groups": plan.layer_groups(config, wildcards.model, n, layers),
        "views": plan.model_views(config, wildcards.model),
        "first_index": 0,
        "split_sequence": plan.fit_halves_split(config, [N], chunk),
    }


def scaling_point_path(pattern, wildcards, n, N):
    return path(pattern, model=wildcards.model, view=wildcards.view, n=n, N=N)


def scaling_spectrum_inputs(wildcards):
    point = (int(wildcards.n), int(wildcards.N))
    out = rules.scaling_eigen_rows.output
    ins = {
        k: scaling_point_path(getattr(out, k), wildcards, *point)
        for k in ("rows", "halves")
    }
    if point in plan.scaling_points(config, wildcards.model)["full"]:
        ins["full"] = scaling_point_path(
            rules.scaling_eigen_full.output[0], wildcards, *point
        )
    return ins


def scaling_spectrum(model, view, n, N):
    """A grid point's spectrum.csv: the main run's where the point coincides with it."""
    if plan.is_main_point(config, model, n, N):
        return path(rules.eigen_spectrum.output[0], model=model, view=view)
    return path(
        rules.scaling_eigen_spectrum.output[0], model=model, view=view, n=n, N=N
    )


def scaling_spectra(wildcards):
    return [
        scaling_spectrum(wildcards.model, wildcards.view, n, N)
        for n, N in plan.scaling_points(config, wildcards.model)["all"]
    ]


def scaling_table_params(wildcards):
    return settings.ScalingTable.from_config(config, wildcards.model).params()


def scaling_files(name):
    """One output of the scaling table rule (`table`, `fits`, `saturation`) per model and view."""
    return [
        path(getattr(rules.scaling_table.output, name), model=m, view=v)
        for m in plan.scaling_models(config)
        for v in plan.model_views(config, m)
    ]


def scaling_outputs():
    return [p for name in ("table", "fits", "saturation") for p in scaling_files(name)]
