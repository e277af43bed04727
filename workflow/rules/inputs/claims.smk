# The claims stage's input, param and target functions (its rules: ../claims.smk).


def claims_inputs(wildcards):
    return {
        "spectra": eigen_outputs(),
        "per_input": per_input_outputs("summary"),
        "overlap_summary": rules.overlap_summary.output[0],
        "recon": reconstruct_outputs(),
        "plugin": plugin_outputs(),
        "plans": plan_outputs(),
        "latency": latency_outputs(),
        **({"training": rules.train_summary.output.comparisons} if TRAINING else {}),
        "scaling_fits": scaling_files("fits"),
        "scaling_saturation": scaling_files("saturation"),
        "scaling_tables": scaling_files("table"),
    }
