# Reference statistics per (split, space) and the FDr normalisers.


rule stats:
    input:
        "results/features/real/{split}/{space}.h5",
    output:
        "results/stats/{split}/{space}.npz",
    log:
        log_path("stats", "{split}", "{space}"),
    benchmark:
        bench_path("stats", "{split}", "{space}")
    threads: res("stats", "threads")
    resources:
        mem_mb=res("stats", "mem_mb"),
        runtime=res("stats", "runtime"),
    shell:
        "{FDPIPE} stats --features {input} --out {output} > {log} 2>&1"


rule valfd:
    input:
        features=expand("results/features/real/test/{space}.h5", space=EVAL_SPACES),
        stats=expand("results/stats/train/{space}.npz", space=EVAL_SPACES),
    output:
        "results/stats/valfd.json",
    params:
        spaces=" ".join(EVAL_SPACES),
    log:
        log_path("valfd", "valfd"),
    threads: res("valfd", "threads")
    resources:
        mem_mb=res("valfd", "mem_mb"),
        runtime=res("valfd", "runtime"),
    shell:
        "{FDPIPE} valfd --spaces {params.spaces} --features {input.features}"
        " --stats {input.stats} --out {output} > {log} 2>&1"
