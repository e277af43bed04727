# Stage 3: row and full-matrix spectra of every model and view, and the per-input spectrum of
# attention probabilities (docs/method.md §12). The Dask scheduler is part of `runtime`, not a
# recorded param: where a computation runs must not trigger a re-run.


include: "inputs/eigen.smk"


rule stream_moments:
    """Streamed mode: row moments of one layer group over one shard of the fit split, from the forward pass."""
    input:
        model=model_dir,
        passages=passages(),
    output:
        directory("results/moments/{model}/group-{group}/shard-{shard}.zarr"),
    log:
        "logs/stream_moments/{model}/group-{group}/shard-{shard}.log",
    benchmark:
        "benchmarks/out/stream_moments/{model}/group-{group}/shard-{shard}.tsv"
    priority: 10
    conda:
        "../../envs/eigenattn.yaml"
    threads: 1
    resources:
        mem_mb=stream_mem_mb,
        gpu=gpus_for("extraction"),
    params:
        settings=stream_settings,
        facts=model_facts,
        runtime=runtime("extraction"),
    script:
        "../scripts/stream_moments.py"


rule eigen_rows:
    """Row spectra of every head (from the score stores with Dask, or merged streamed moments), and their split halves."""
    input:
        row_inputs,
    output:
        rows=directory("results/eigen/{model}/{view}/rows.zarr"),
        halves=directory("results/eigen/{model}/{view}/halves.zarr"),
    log:
        "logs/eigen_rows/{model}/{view}.log",
    benchmark:
        "benchmarks/out/eigen_rows/{model}/{view}.tsv"
    # the main run's longest chain (extraction, row spectra, reconstruction, plug-in) starts before
    # ready training runs and the scaling grid (whose copies of these rules set priority 0)
    priority: 10
    conda:
        "../../envs/eigenattn.yaml"
    threads: job_threads
    resources:
        mem_mb=mem_mb(4000),
    params:
        view=lambda wildcards: wildcards.view,
        variants=EIGEN.variants,
        split_every=EIGEN.split_every,
        vectors=EIGEN.vector_dtype,
        expect=expected_fit_scores,
        streamed=rows_streamed,
        runtime=runtime("eigen"),
    script:
        "../scripts/eigen_rows.py"


rule eigen_full:
    """Full-matrix spectra of every head (covariance or Gram route)."""
    input:
        fit_shards,
    output:
        directory("results/eigen/{model}/{view}/full.zarr"),
    log:
        "logs/eigen_full/{model}/{view}.log",
    benchmark:
        "benchmarks/out/eigen_full/{model}/{view}.tsv"
    conda:
        "../../envs/eigenattn.yaml"
    threads: job_threads
    resources:
        mem_mb=gram_mem_mb,
    params:
        view=lambda wildcards: wildcards.view,
        variants=EIGEN.variants,
        rank=EIGEN.full_rank,
        seed=config["seed"],
        expect=expected_fit_scores,
        runtime=runtime("eigen"),
    script:
        "../scripts/eigen_full.py"


rule eigen_spectrum:
    """One spectrum table per model and view, from the row and full spectra."""
    input:
        unpack(spectrum_inputs),
    output:
        "results/eigen/{model}/{view}/spectrum.csv",
    log:
        "logs/eigen_spectrum/{model}/{view}.log",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        p=settings.Spectrum.from_config(config).params(),
    script:
        "../scripts/eigen_spectrum.py"


rule eigen_per_input:
    """Per-input spectra of the attention probabilities (Linformer's analysis)."""
    input:
        per_input_shards,
    output:
        curves="results/eigen/{model}/{view}/per_input.csv",
        summary="results/eigen/{model}/{view}/per_input_summary.csv",
    log:
        "logs/eigen_per_input/{model}/{view}.log",
    benchmark:
        "benchmarks/out/eigen_per_input/{model}/{view}.tsv"
    conda:
        "../../envs/eigenattn.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
    params:
        view=lambda wildcards: wildcards.view,
        settings=settings.PerInput.from_config(config).params(),
        expect=expected_per_input_scores,
    script:
        "../scripts/eigen_per_input.py"


rule eigen:
    """Stage 3: every spectrum table and the per-input spectra."""
    input:
        eigen_outputs(),
        per_input_outputs(),
