# Features of real and generated images, one HDF5 file per (image set, space).


rule extract_real:
    input:
        images=REAL_IMAGES,
        weights=lambda w: space_weights(w.space),
    output:
        "results/features/real/{split}/{space}.h5",
    params:
        spec=lambda w: spec_arg(space_spec(w.space)),
        batch_size=CFG["evaluation"]["batch_size"],
    log:
        log_path("extract_real", "{split}", "{space}"),
    benchmark:
        bench_path("extract_real", "{split}", "{space}")
    threads: res("extract_real", "threads")
    resources:
        mem_mb=res("extract_real", "mem_mb"),
        runtime=res("extract_real", "runtime"),
        gpu=res("extract_real", "gpu"),
        **slurm_resources("extract_real"),
    shell:
        "{FDPIPE} extract --space {wildcards.space} --spec {params.spec} --images {input.images}"
        " --batch-size {params.batch_size} --device {DEVICE} --threads {threads}"
        " {SKIP_BAD_IMAGES} --out {output} > {log} 2>&1"


rule extract_generated:
    input:
        images="results/samples/{variant}.h5",
        weights=lambda w: space_weights(w.space),
    output:
        "results/features/generated/{variant}/{space}.h5",
    params:
        spec=lambda w: spec_arg(space_spec(w.space)),
        batch_size=CFG["evaluation"]["batch_size"],
    log:
        log_path("extract_generated", "{variant}", "{space}"),
    benchmark:
        bench_path("extract_generated", "{variant}", "{space}")
    threads: res("extract_generated", "threads")
    resources:
        mem_mb=res("extract_generated", "mem_mb"),
        runtime=res("extract_generated", "runtime"),
        gpu=res("extract_generated", "gpu"),
        **slurm_resources("extract_generated"),
    shell:
        "{FDPIPE} extract --space {wildcards.space} --spec {params.spec} --images {input.images}"
        " --batch-size {params.batch_size} --device {DEVICE} --threads {threads}"
        " --out {output} > {log} 2>&1"
