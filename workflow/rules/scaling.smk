# The scaling study (docs/method.md §10): the sampling, extraction and eigen rules, reused over a
# grid of sequence lengths n and sample counts N. A grid point that coincides with the main run
# (same n and N) reads the main run's outputs instead of storing its scores twice.


include: "inputs/scaling.smk"


use rule sample_passages as scaling_sample_passages with:
    """Scaling study: sample the passages of one grid point (n, N)."""
    output:
        "results/scaling/corpus/{corpus}/n{n}/N{N}/passages.parquet",
    log:
        "logs/scaling/sample_passages/{corpus}/n{n}/N{N}.log",
    params:
        settings=scaling_sampling_settings,


use rule extract_scores as scaling_extract_scores with:
    """Scaling study: store the scores of one grid point (n, N)."""
    input:
        model=model_dir,
        passages=scaling_passages,
    output:
        directory("results/scaling/scores/{model}/n{n}/N{N}/fit.zarr"),
    log:
        "logs/scaling/extract/{model}/n{n}/N{N}.log",
    benchmark:
        "benchmarks/out/scaling/extract/{model}/n{n}/N{N}.tsv"
    priority: 0
    params:
        settings=scaling_extraction_settings,


use rule stream_moments as scaling_stream_moments with:
    """Scaling study, streamed: the row moments of one layer group at one grid point (n, N)."""
    input:
        model=model_dir,
        passages=scaling_passages,
    output:
        directory("results/scaling/moments/{model}/n{n}/N{N}/group-{group}.zarr"),
    log:
        "logs/scaling/stream_moments/{model}/n{n}/N{N}/group-{group}.log",
    benchmark:
        "benchmarks/out/scaling/stream_moments/{model}/n{n}/N{N}/group-{group}.tsv"
    priority: 0
    params:
        settings=scaling_stream_settings,
        facts=model_facts,
        runtime=runtime("extraction"),


use rule eigen_rows as scaling_eigen_rows with:
    """Scaling study: row spectra of one grid point (n, N)."""
    input:
        scaling_row_inputs,
    output:
        rows=directory("results/scaling/eigen/{model}/n{n}/N{N}/{view}/rows.zarr"),
        halves=directory("results/scaling/eigen/{model}/n{n}/N{N}/{view}/halves.zarr"),
    log:
        "logs/scaling/eigen_rows/{model}/n{n}/N{N}/{view}.log",
    benchmark:
        "benchmarks/out/scaling/eigen_rows/{model}/n{n}/N{N}/{view}.tsv"
    priority: 0


use rule eigen_full as scaling_eigen_full with:
    """Scaling study: full-matrix spectra of one grid point (n, N)."""
    input:
        rules.scaling_extract_scores.output[0],
    output:
        directory("results/scaling/eigen/{model}/n{n}/N{N}/{view}/full.zarr"),
    log:
        "logs/scaling/eigen_full/{model}/n{n}/N{N}/{view}.log",
    benchmark:
        "benchmarks/out/scaling/eigen_full/{model}/n{n}/N{N}/{view}.tsv"
    resources:
        mem_mb=gram_mem_mb,


use rule eigen_spectrum as scaling_eigen_spectrum with:
    """Scaling study: the spectrum table of one grid point (n, N)."""
    input:
        unpack(scaling_spectrum_inputs),
    output:
        "results/scaling/eigen/{model}/n{n}/N{N}/{view}/spectrum.csv",
    log:
        "logs/scaling/eigen_spectrum/{model}/n{n}/N{N}/{view}.log",


rule scaling_table:
    """Scaling study: spectra against n and N, fitted laws and saturation."""
    input:
        spectra=scaling_spectra,
    output:
        table="results/scaling/{model}/{view}.csv",
        fits="results/scaling/{model}/{view}.fits.csv",
        saturation="results/scaling/{model}/{view}.saturation.csv",
    log:
        "logs/scaling/table/{model}/{view}.log",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        p=scaling_table_params,
    script:
        "../scripts/scaling_table.py"


rule scaling:
    """The scaling study: every grid point and its tables."""
    input:
        scaling_outputs(),
