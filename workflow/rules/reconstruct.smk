# Stage 5: reconstruction from partial computation, on held-out scores and inside the models.


include: "inputs/reconstruct.smk"


rule reconstruct_view:
    """Reconstruct held-out scores from key subsets, beside the peers and costs."""
    input:
        rows=rules.eigen_rows.output.rows,
        heldout=heldout_shards,
        fit=fit_shards,
        others=transfer_inputs,
    output:
        "results/reconstruction/{model}/{view}.csv",
    log:
        "logs/reconstruct/{model}/{view}.log",
    benchmark:
        "benchmarks/out/reconstruct/{model}/{view}.tsv"
    # the main run's longest chain (extraction, row spectra, reconstruction, plug-in) starts before
    # ready training runs and the scaling grid (whose copies of these rules set priority 0)
    priority: 10
    conda:
        "../../envs/eigenattn.yaml"
    threads: job_threads
    params:
        settings=reconstruction_settings,
        expect=expected_heldout_scores,
    script:
        "../scripts/reconstruct.py"


rule reconstruct:
    """Stage 5: reconstruction of every model and view."""
    input:
        reconstruct_outputs(),


rule latency_table:
    """Every method's real kernel on one model's view at the run's n, timed against SDPA on this device (docs/method.md §15)."""
    input:
        model=model_dir,
        rows=rules.eigen_rows.output.rows,
    output:
        "results/latency/{model}/{view}.csv",
    log:
        "logs/latency/{model}/{view}.log",
    benchmark:
        "benchmarks/out/latency/{model}/{view}.tsv"
    conda:
        "../../envs/eigenattn.yaml"
    threads: 1
    resources:
        gpu=gpus_for("plugin"),
    params:
        settings=latency_settings,
        repeats=5,
        # the device and torch version the table is measured on: another one re-measures it
        device_key=latency_device_key,
        runtime=runtime("plugin"),
    script:
        "../scripts/latency_table.py"


rule latency:
    """Stage 5: the latency table of every model and view."""
    input:
        latency_outputs(),


rule plugin_eval_model:
    """Reconstructed attention and the peers inside one pretrained model."""
    input:
        model=model_dir,
        rows=plugin_rows,
        heldout=heldout_shards,
        passages=passages(),
    output:
        table="results/plugin/{model}.csv",
        sequences="results/plugin/{model}.sequences.csv",
    log:
        "logs/plugin_eval/{model}.log",
    benchmark:
        "benchmarks/out/plugin_eval/{model}.tsv"
    # the main run's longest chain (extraction, row spectra, reconstruction, plug-in) starts before
    # ready training runs and the scaling grid (whose copies of these rules set priority 0)
    priority: 10
    conda:
        "../../envs/eigenattn.yaml"
    threads: job_threads
    resources:
        gpu=gpus_for("plugin"),
    params:
        settings=settings.Plugin.from_config(config).params(),
        runtime=runtime("plugin"),
    script:
        "../scripts/plugin_eval.py"


rule plugin_eval:
    """Stage 5: the plug-in evaluation of every model."""
    input:
        plugin_outputs(),


rule plan_model:
    """Per-head plans of one model (fit split) at every budget and damage, judged inside the model on held-out documents against the single methods at equal cost."""
    input:
        model=model_dir,
        rows=plugin_rows,
        recon=plan_recon,
        plugin=rules.plugin_eval_model.output[0],
        fit=fit_shards,
        heldout=heldout_shards,
        passages=passages(),
        per_input=plan_per_input,
        latency=plan_latency,
    output:
        plans=directory("results/plans/{model}/plans"),
        summary="results/plans/{model}/summary.csv",
        heads="results/plans/{model}/heads.csv",
        predictors="results/plans/{model}/predictors.csv",
        sequences="results/plans/{model}/sequences.csv",
    log:
        "logs/plans/{model}.log",
    benchmark:
        "benchmarks/out/plans/{model}.tsv"
    priority: 10
    conda:
        "../../envs/eigenattn.yaml"
    threads: 1
    resources:
        gpu=gpus_for("plugin"),
    params:
        settings=settings.Plans.from_config(config).params(),
        plugin=settings.Plugin.from_config(config).params(),
        runtime=runtime("plugin"),
    script:
        "../scripts/plan_model.py"


rule plans:
    """Per-head plans of every model."""
    input:
        plan_outputs(),
