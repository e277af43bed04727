# The reconstruct stage's input, param and target functions (its rules: ../reconstruct.smk).


def expected_heldout_scores(wildcards):
    return settings.expected_scores(config, wildcards.model, "heldout")


def transfer_inputs(wildcards):
    others = plan.other_models(config, wildcards.model, wildcards.view)
    return expand(rules.eigen_rows.output.rows, model=others, view="prefix")


def reconstruction_settings(wildcards):
    return settings.Reconstruction.from_config(
        config, wildcards.model, wildcards.view
    ).params()


def reconstruct_outputs():
    return [
        path(rules.reconstruct_view.output[0], model=m, view=v)
        for m, v in model_view_pairs()
    ]


def latency_outputs():
    return [
        path(rules.latency_table.output[0], model=m, view=v)
        for m, v in model_view_pairs()
    ]


def latency_settings(wildcards):
    """What the latency table measures: the subset sizes and the peers' settings of the view (not
    the rest of the reconstruction settings, so that e.g. run_models re-measures nothing).
    """
    r = settings.Reconstruction.from_config(config, wildcards.model, wildcards.view)
    return {
        "subset_sizes": list(r.subset_sizes),
        "sinks": r.sinks,
        "q_last": r.q_last,
        "pinv": list(r.pinv),
        "seed": r.seed,
    }


def latency_device_key(wildcards):
    """The device (``plugin.device``, where the models run; a CPU by its model name) and torch
    version the latency table is measured on, read without importing torch: a change re-measures
    the table."""
    return needs.device_key(config["plugin"]["device"])


def plugin_rows(wildcards):
    view = plan.plugin_view(config, wildcards.model)
    return path(rules.eigen_rows.output.rows, model=wildcards.model, view=view)


def plugin_outputs():
    return expand(rules.plugin_eval_model.output[0], model=MODELS)


PLANS = bool(config["plans"]["budgets"])  # plans.budgets: [] plans nothing


def _plugin_view_path(pattern, wildcards):
    view = plan.plugin_view(config, wildcards.model)
    return path(pattern, model=wildcards.model, view=view)


def plan_recon(wildcards):
    return _plugin_view_path(rules.reconstruct_view.output[0], wildcards)


def plan_latency(wildcards):
    """The plug-in view's latency table when plans.cost is time (its candidates priced by it)."""
    if config["plans"]["cost"] != "time":
        return []
    return _plugin_view_path(rules.latency_table.output[0], wildcards)


def plan_per_input(wildcards):
    return _plugin_view_path(rules.eigen_per_input.output.summary, wildcards)


def plan_outputs(name="summary"):
    if not PLANS:
        return []
    return expand(getattr(rules.plan_model.output, name), model=MODELS)
