# The notebooks stage's input, param and target functions (its rules: ../notebooks.smk).


def notebook_data(name):
    """The pipeline outputs each notebook reads (its papermill parameters)."""
    if name == "spectrum":
        return {"eigen_dirs": eigen_dirs()}
    if name == "overlap":
        return {
            "within": overlap_within_outputs(),
            "cross": overlap_cross_outputs(),
            "summary": rules.overlap_summary.output[0],
            "k_heatmap": config["claims"]["k_report"],
        }
    if name == "reconstruction":
        return {
            "recon": reconstruct_outputs(),
            "plugin": plugin_outputs(),
            "s_report": config["claims"]["s_report"],
        }
    if name == "training":
        return {
            "summary": rules.train_summary.output.summary,
            "comparisons": rules.train_summary.output.comparisons,
            "metrics": run_outputs("metrics"),
        }
    if name == "plans":
        return {
            "summaries": plan_outputs(),
            "heads": plan_outputs("heads"),
            "predictors": plan_outputs("predictors"),
            "sequences": plan_outputs("sequences"),
            "plugin": plugin_outputs(),
        }
    if name == "scaling":
        return {
            "tables": scaling_files("table"),
            "fits": scaling_files("fits"),
            "saturation": scaling_files("saturation"),
        }
    return {"claims": rules.claims.output[0]}


def notebook_inputs(wildcards):
    files = []
    for k, v in notebook_data(wildcards.name).items():
        if k == "eigen_dirs":
            files += [
                f"{d}/{f}"
                for d in v
                for f in (
                    "spectrum.csv",
                    "rows.zarr",
                    "full.zarr",
                    "per_input.csv",
                    "per_input_summary.csv",
                )
                if f != "full.zarr" or not streamed(Path(d).parent.name)
            ]
        elif isinstance(v, list):
            files += v
        elif isinstance(v, str):
            files.append(v)
    nb = checkout_file("notebooks", f"{wildcards.name}.ipynb")
    return {"nb": nb, "data": files}


def notebook_params(wildcards):
    return json.dumps(
        {
            **notebook_data(wildcards.name),
            "fig_dir": f"results/figures/{wildcards.name}",
        }
    )


def notebook_outputs():
    return expand(rules.notebook.output.nb, name=NOTEBOOKS)
