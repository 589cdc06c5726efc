# The built-in base generator (skipped when generator.checkpoint is set).


rule pretrain:
    input:
        "results/data/train.h5",
    output:
        "results/generators/base.pt",
    params:
        spec=spec_arg({k: CFG["generator"][k] for k in ("options", "pretrain")}),
    log:
        log_path("pretrain", "base"),
    benchmark:
        bench_path("pretrain", "base")
    threads: res("pretrain", "threads")
    resources:
        mem_mb=res("pretrain", "mem_mb"),
        runtime=res("pretrain", "runtime"),
        gpu=res("pretrain", "gpu"),
        **slurm_resources("pretrain"),
    shell:
        "{FDPIPE} pretrain --spec {params.spec} --train {input} --seed {SEED}"
        " --threads {threads} --out {output} > {log} 2>&1"
