# eigenattn: eigen analysis of transformer self-attention (see README.md and docs/method.md).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/assets.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/eigen.smk"
include: "workflow/rules/overlap.smk"
include: "workflow/rules/reconstruct.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/scaling.smk"
include: "workflow/rules/claims.smk"
include: "workflow/rules/notebooks.smk"


# Once every rule is defined (the stores are named by their outputs): the score stores' sizes,
# stated, and refused before any job when they cannot fit the free disk (README, Configuration).
STORE_SIZES = score_store_sizes()


rule all:
    """Every output of the default run: all stages, the notebooks and the claims table."""
    default_target: True
    input:
        all_outputs,


onstart:
    log_start()


onsuccess:
    print("eigenattn: workflow finished; outputs under results/, logs under logs/")


onerror:
    print(
        "eigenattn: a job failed; its log file is the `log:` path in the 'Error in rule' block above "
        "(how logs/ is laid out: README.md, section Logs)"
    )
