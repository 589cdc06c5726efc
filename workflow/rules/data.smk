# Real images: one fdpipe image file per dataset split.


rule prepare_data:
    output:
        "results/data/{split}.h5",
    params:
        root=CFG["data"]["root"],
        dataset=CFG["data"]["dataset"],
        resolution=CFG["data"]["resolution"],
        subset=lambda w: CFG["data"][f"{w.split}_subset"] or 0,
    log:
        log_path("prepare_data", "{split}"),
    benchmark:
        bench_path("prepare_data", "{split}")
    threads: res("prepare_data", "threads")
    resources:
        mem_mb=res("prepare_data", "mem_mb"),
        runtime=res("prepare_data", "runtime"),
    shell:
        "{FDPIPE} prepare --dataset {params.dataset} --root {params.root:q} --split {wildcards.split}"
        " --resolution {params.resolution} --subset {params.subset} --seed {SEED}"
        " --out {output} > {log} 2>&1"
