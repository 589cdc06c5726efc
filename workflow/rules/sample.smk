# Samples of every variant: the base model at each step count and each run.

GENERATOR_SPEC = spec_arg({k: CFG["generator"][k] for k in ("factory", "checkpoint", "options")})


rule sample_base:
    input:
        BASE_CHECKPOINT,
    output:
        images="results/samples/base-{steps}step.h5",
        grid="results/samples/base-{steps}step.png",
    params:
        spec=GENERATOR_SPEC,
        num_samples=CFG["evaluation"]["num_samples"],
        batch_size=CFG["evaluation"]["batch_size"],
        guidance=CFG["generator"]["guidance_scale"],
    log:
        log_path("sample_base", "base-{steps}step"),
    benchmark:
        bench_path("sample_base", "base-{steps}step")
    threads: res("sample_base", "threads")
    resources:
        mem_mb=res("sample_base", "mem_mb"),
        runtime=res("sample_base", "runtime"),
        gpu=res("sample_base", "gpu"),
        **slurm_resources("sample_base"),
    shell:
        "{FDPIPE} sample --spec {params.spec} --generator-checkpoint {input}"
        " --steps {wildcards.steps} --guidance-scale {params.guidance}"
        " --num-samples {params.num_samples} --batch-size {params.batch_size} --seed {SEED}"
        " --device {DEVICE} --threads {threads} --out {output.images} --grid {output.grid}"
        " > {log} 2>&1"


rule sample_run:
    input:
        "results/runs/{run}/generator.pt",
    output:
        images="results/samples/{run}.h5",
        grid="results/samples/{run}.png",
    params:
        num_samples=CFG["evaluation"]["num_samples"],
        batch_size=CFG["evaluation"]["batch_size"],
        guidance=CFG["generator"]["guidance_scale"],
        steps=lambda w: ALL_RUNS[w.run]["sample_steps"],
    log:
        log_path("sample_run", "{run}"),
    benchmark:
        bench_path("sample_run", "{run}")
    threads: res("sample_run", "threads")
    resources:
        mem_mb=res("sample_run", "mem_mb"),
        runtime=res("sample_run", "runtime"),
        gpu=res("sample_run", "gpu"),
        **slurm_resources("sample_run"),
    shell:
        "{FDPIPE} sample --run {input} --steps {params.steps} --guidance-scale {params.guidance}"
        " --num-samples {params.num_samples} --batch-size {params.batch_size} --seed {SEED}"
        " --device {DEVICE} --threads {threads} --out {output.images} --grid {output.grid}"
        " > {log} 2>&1"
