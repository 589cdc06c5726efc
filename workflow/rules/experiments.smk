# Experiment sets: one table (and figure) per set, asked for by name, e.g.
# `snakemake results/tables/queue_size.md`.


def nfe_per_image(variant):
    guided = CFG["generator"]["guidance_scale"] != 1.0
    if variant.startswith("base-"):
        steps = int(variant[len("base-"):-len("step")])
    else:
        steps = ALL_RUNS[variant]["sample_steps"]
    return steps * (2 if guided else 1)


def experiment_spec(name):
    experiment = EXPERIMENTS[name]
    # Rows go as a list because spec_arg sorts dict keys and the set's order matters.
    spec = {"name": name, "varied": experiment.varied, "rows": list(experiment.rows.items()),
            "fixed": experiment.fixed, "spaces": EVAL_SPACES, "fdrk_spaces": FDRK_SPACES}
    if name == "repurpose":
        spec["costs"] = {v: nfe_per_image(v) for v in experiment.variants}
    return spec_arg(spec)


def experiment_evals(name):
    return expand("results/eval/{variant}/{space}.json",
                  variant=EXPERIMENTS[name].variants, space=EVAL_SPACES)


rule experiment_table:
    input:
        lambda w: experiment_evals(w.experiment),
    output:
        csv="results/tables/{experiment}.csv",
        md="results/tables/{experiment}.md",
        figure="results/figures/{experiment}.png",
    params:
        spec=lambda w: experiment_spec(w.experiment),
    log:
        log_path("experiment_table", "{experiment}"),
    threads: res("experiment_table", "threads")
    resources:
        mem_mb=res("experiment_table", "mem_mb"),
        runtime=res("experiment_table", "runtime"),
        **slurm_resources("experiment_table"),
    shell:
        "{FDPIPE} experiment-table --spec {params.spec} --evals {input} --csv {output.csv}"
        " --md {output.md} --figure {output.figure} > {log} 2>&1"


rule rank_agreement:
    input:
        lambda w: experiment_evals("spaces"),
    output:
        csv="results/tables/rank_agreement.csv",
        md="results/tables/rank_agreement.md",
    params:
        spec=spec_arg({"spaces": EVAL_SPACES, "fdrk_spaces": FDRK_SPACES}),
    log:
        log_path("rank_agreement", "spaces"),
    threads: res("rank_agreement", "threads")
    resources:
        mem_mb=res("rank_agreement", "mem_mb"),
        runtime=res("rank_agreement", "runtime"),
        **slurm_resources("rank_agreement"),
    shell:
        "{FDPIPE} rank-agreement --spec {params.spec} --evals {input} --csv {output.csv}"
        " --md {output.md} > {log} 2>&1"


rule experiments:
    input:
        expand("results/tables/{experiment}.md", experiment=EXPERIMENTS),
        ["results/tables/rank_agreement.md"] if "spaces" in EXPERIMENTS else [],
