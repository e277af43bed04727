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


def plugin_rows(wildcards):
    view = plan.plugin_view(config, wildcards.model)
    return path(rules.eigen_rows.output.rows, model=wildcards.model, view=view)


def plugin_outputs():
    return expand(rules.plugin_eval_model.output[0], model=MODELS)
