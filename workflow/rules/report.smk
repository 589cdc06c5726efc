# The final FDr^k table (CSV, Markdown) and figure.


def variant_info():
    info = {v: {"steps": n, "train_spaces": "-"} for v, n in zip(BASE_VARIANTS, BASE_STEPS)}
    for run, settings in RUNS.items():
        info[run] = {"steps": settings["sample_steps"], "train_spaces": settings["spaces"]}
    return info


rule aggregate:
    input:
        expand("results/eval/{variant}/{space}.json", variant=VARIANTS, space=EVAL_SPACES),
    output:
        csv="results/tables/fdrk.csv",
        md="results/tables/fdrk.md",
        figure="results/figures/fdrk.png",
    params:
        spec=spec_arg({"spaces": EVAL_SPACES, "fdrk_spaces": FDRK_SPACES,
                       "variants": variant_info()}),
    log:
        log_path("aggregate", "fdrk"),
    threads: res("aggregate", "threads")
    resources:
        mem_mb=res("aggregate", "mem_mb"),
        runtime=res("aggregate", "runtime"),
        **slurm_resources("aggregate"),
    shell:
        "{FDPIPE} aggregate --spec {params.spec} --evals {input} --csv {output.csv}"
        " --md {output.md} --figure {output.figure} > {log} 2>&1"
