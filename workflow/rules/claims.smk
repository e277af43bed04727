# Stage 7: the claims table, every C1-C4 value with its state, from the stages' CSVs.


include: "inputs/claims.smk"


rule claims:
    """Stage 7: the claims table, every claim value with its state."""
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
