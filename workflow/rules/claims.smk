# Stage 7: the claims table, every C1-C4 value with its state, from the stages' CSVs.


def claims_inputs(wildcards):
    return {
        "spectra": eigen_outputs(),
        "overlap_summary": rules.overlap_summary.output[0],
        "recon": reconstruct_outputs(),
        "plugin": plugin_outputs(),
        "training": rules.train_summary.output[0],
        "scaling_fits": scaling_files("fits"),
        "scaling_saturation": scaling_files("saturation"),
        "scaling_tables": scaling_files("table"),
    }


rule claims:
    input:
        unpack(claims_inputs),
    output:
        "results/claims.csv",
    log:
        "logs/claims.log",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        settings=settings.ClaimThresholds.from_config(config).params(),
    script:
        "../scripts/claims.py"
