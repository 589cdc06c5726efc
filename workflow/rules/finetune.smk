# FD-loss post-training, one job per configured run.


def finetune_launcher(gpus):
    """Command that starts `fdpipe`: plain, or torchrun with one process per GPU.

    `exec` replaces the job's shell with Python, so SIGTERM from SLURM (see
    the slurm profile) reaches the training process, which checkpoints and
    exits with code 75; a rerun resumes from the checkpoint.
    """
    if gpus > 1:
        return (f"exec {shlex.quote(sys.executable)} -m torch.distributed.run --standalone"
                f" --nproc_per_node {gpus} -m fdpipe")
    return f"exec {FDPIPE}"


def finetune_spec(run):
    return spec_arg({
        "run": ALL_RUNS[run],
        "spaces": {s: space_spec(s) for s in ALL_RUNS[run]["spaces"]},
        "generator": {k: CFG["generator"][k] for k in ("factory", "checkpoint", "options")},
        "guidance_scale": CFG["generator"]["guidance_scale"],
    })


rule finetune:
    input:
        base=BASE_CHECKPOINT,
        stats=lambda w: expand("results/stats/train/{space}.npz", space=ALL_RUNS[w.run]["spaces"]),
        weights=lambda w: [p for s in ALL_RUNS[w.run]["spaces"] for p in space_weights(s)],
    output:
        checkpoint="results/runs/{run}/generator.pt",
        metrics="results/runs/{run}/metrics.jsonl",
    params:
        spec=lambda w: finetune_spec(w.run),
        spaces=lambda w: " ".join(ALL_RUNS[w.run]["spaces"]),
        out_dir="results/runs/{run}",
        launcher=lambda w, resources: finetune_launcher(resources.gpu),
        process_threads=lambda w, threads, resources: max(1, threads // max(1, resources.gpu)),
    log:
        log_path("finetune", "{run}"),
    benchmark:
        bench_path("finetune", "{run}")
    threads: res("finetune", "threads")
    resources:
        mem_mb=res("finetune", "mem_mb"),
        runtime=res("finetune", "runtime"),
        gpu=res("finetune", "gpu"),
        **slurm_resources("finetune"),
    shell:
        "{params.launcher} finetune --spec {params.spec} --generator-checkpoint {input.base}"
        " --spaces {params.spaces} --stats {input.stats} --seed {SEED} --device {DEVICE}"
        " --threads {params.process_threads} --out-dir {params.out_dir} > {log} 2>&1"
