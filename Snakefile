# fdpipe: FD-loss post-training and FDr^k evaluation, from data to tables.
# Rules live in workflow/rules/<stage>.smk; logic lives in the fdpipe package.

from snakemake.utils import min_version

min_version("8.20")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/encoders.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/stats.smk"
include: "workflow/rules/generator.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/experiments.smk"


rule all:
    input:
        "results/tables/fdrk.md",
        "results/tables/fdrk.csv",
        "results/figures/fdrk.png",
    default_target: True
