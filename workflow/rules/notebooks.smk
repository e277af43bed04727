# Stage 8: the notebooks, executed by papermill and rendered to HTML, and the report.


include: "inputs/notebooks.smk"


# One rule for every notebook: papermill runs it (parameters from config), nbconvert renders it
# to HTML. The notebook file itself is an input, so editing one re-renders only that notebook.


rule notebook:
    """Execute one notebook with papermill, save its figures, render it to HTML."""
    input:
        unpack(notebook_inputs),
    output:
        nb="results/notebooks/{name}.ipynb",
        figures=report(
            directory("results/figures/{name}"),
            patterns=["{fig}.png"],
            caption="../report/figure.rst",
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
    """Stage 8: every notebook, its figures and HTML."""
    input:
        notebook_outputs(),
