# Each notebook runs through papermill (parameters from config), then nbconvert renders it to HTML.
# The notebook file itself is an input, so editing one re-renders only that notebook.
NOTEBOOK_CMD = (
    "papermill {input.nb} {output.nb} --kernel python3 --cwd . --log-output "
    "--parameters_yaml '{params.yaml}' > {log} 2>&1 && "
    "jupyter nbconvert --to html --no-input --output-dir results/report "
    "--output {wildcards.name} {output.nb} >> {log} 2>&1"
)


rule notebook_spectrum:
    input:
        unpack(notebook_inputs),
    output:
        nb="results/notebooks/{name}.ipynb",
        figures=report(
            directory("results/figures/{name}"),
            patterns=["{fig}.png"],
            caption="../report/spectrum.rst",
            category="C1 spectrum",
        ),
        html="results/report/{name}.html",
    log:
        "logs/notebooks/{name}.log",
    wildcard_constraints:
        name="spectrum",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        yaml=notebook_params,
    shell:
        NOTEBOOK_CMD


rule notebook_overlap:
    input:
        unpack(notebook_inputs),
    output:
        nb="results/notebooks/{name}.ipynb",
        figures=report(
            directory("results/figures/{name}"),
            patterns=["{fig}.png"],
            caption="../report/overlap.rst",
            category="C2 overlap",
        ),
        html="results/report/{name}.html",
    log:
        "logs/notebooks/{name}.log",
    wildcard_constraints:
        name="overlap",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        yaml=notebook_params,
    shell:
        NOTEBOOK_CMD


rule notebook_reconstruction:
    input:
        unpack(notebook_inputs),
    output:
        nb="results/notebooks/{name}.ipynb",
        figures=report(
            directory("results/figures/{name}"),
            patterns=["{fig}.png"],
            caption="../report/reconstruction.rst",
            category="C3 reconstruction",
        ),
        html="results/report/{name}.html",
    log:
        "logs/notebooks/{name}.log",
    wildcard_constraints:
        name="reconstruction",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        yaml=notebook_params,
    shell:
        NOTEBOOK_CMD


rule notebook_training:
    input:
        unpack(notebook_inputs),
    output:
        nb="results/notebooks/{name}.ipynb",
        figures=report(
            directory("results/figures/{name}"),
            patterns=["{fig}.png"],
            caption="../report/training.rst",
            category="C4 training",
        ),
        html="results/report/{name}.html",
    log:
        "logs/notebooks/{name}.log",
    wildcard_constraints:
        name="training",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        yaml=notebook_params,
    shell:
        NOTEBOOK_CMD


rule notebook_summary:
    input:
        unpack(notebook_inputs),
    output:
        nb="results/notebooks/{name}.ipynb",
        figures=report(
            directory("results/figures/{name}"),
            patterns=["{fig}.png"],
            caption="../report/summary.rst",
            category="Claims",
        ),
        html="results/report/{name}.html",
    log:
        "logs/notebooks/{name}.log",
    wildcard_constraints:
        name="summary",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        yaml=notebook_params,
    shell:
        NOTEBOOK_CMD


rule notebooks:
    input:
        notebook_outputs(),
