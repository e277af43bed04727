rule eigen_rows:
    input:
        fit_shards,
    output:
        rows=directory("results/eigen/{model}/{view}/rows.zarr"),
        halves=directory("results/eigen/{model}/{view}/halves.zarr"),
    log:
        "logs/eigen_rows/{model}/{view}.log",
    benchmark:
        "benchmarks/out/eigen_rows/{model}/{view}.tsv"
    conda:
        "../../envs/eigenattn.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(4000),
    params:
        p=eigen_rows_params,
    script:
        "../scripts/eigen_rows.py"


rule eigen_full:
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
    threads: 2
    resources:
        mem_mb=gram_mem_mb,
    params:
        p=eigen_full_params,
    script:
        "../scripts/eigen_full.py"


rule eigen_spectrum:
    input:
        rows=rules.eigen_rows.output.rows,
        halves=rules.eigen_rows.output.halves,
        full=rules.eigen_full.output[0],
    output:
        "results/eigen/{model}/{view}/spectrum.csv",
    log:
        "logs/eigen_spectrum/{model}/{view}.log",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        p=eigen_spectrum_params,
    script:
        "../scripts/eigen_spectrum.py"


rule eigen:
    input:
        eigen_outputs(),
