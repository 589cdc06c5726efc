# Real images: an fdpipe image file (fashion-mnist) or a checked manifest
# (imagefolder, npz) per dataset split.


rule prepare_data:
    output:
        REAL_IMAGES,
    params:
        root=CFG["data"]["root"],
        dataset=DATASET,
        source=lambda w: CFG["data"]["splits"][w.split],
        resolution=CFG["data"]["resolution"],
        subset=lambda w: CFG["data"][f"{w.split}_subset"] or 0,
        skip_bad=SKIP_BAD_IMAGES,
    log:
        log_path("prepare_data", "{split}"),
    benchmark:
        bench_path("prepare_data", "{split}")
    threads: res("prepare_data", "threads")
    resources:
        mem_mb=res("prepare_data", "mem_mb"),
        runtime=res("prepare_data", "runtime"),
        **slurm_resources("prepare_data"),
    shell:
        "{FDPIPE} prepare --dataset {params.dataset} --root {params.root:q} --split {wildcards.split}"
        " --source {params.source:q} --resolution {params.resolution} --subset {params.subset}"
        " --seed {SEED} {params.skip_bad} --out {output} > {log} 2>&1"
