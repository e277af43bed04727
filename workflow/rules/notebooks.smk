# Stage 8: the notebooks, executed by papermill and rendered to HTML, and the report.


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
            "summary": rules.train_summary.output[0],
            "metrics": run_outputs("metrics"),
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
                for f in ("spectrum.csv", "rows.zarr", "full.zarr")
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


# One rule for every notebook: papermill runs it (parameters from config), nbconvert renders it
# to HTML. The notebook file itself is an input, so editing one re-renders only that notebook.


rule notebook:
    input:
        unpack(notebook_inputs),
    output:
        nb="results/notebooks/{name}.ipynb",
        figures=report(
            directory("results/figures/{name}"),
            patterns=["{fig}.png"],
            caption="../report/notebook.rst",
            category="{name}",
        ),
        html="results/report/{name}.html",
    log:
        "logs/notebooks/{name}.log",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        yaml=notebook_params,
    shell:
        "papermill {input.nb:q} {output.nb:q} --kernel python3 --cwd . --log-output "
        "--parameters_yaml {params.yaml:q} > {log:q} 2>&1 && "
        'jupyter nbconvert --to html --no-input --output-dir "$(dirname {output.html:q})" '
        "--output {wildcards.name:q} {output.nb:q} >> {log:q} 2>&1"


rule notebooks:
    input:
        notebook_outputs(),
