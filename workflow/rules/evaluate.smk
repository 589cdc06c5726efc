# FD and FDr of each variant in each evaluation space.


rule evaluate:
    input:
        features="results/features/generated/{variant}/{space}.h5",
        stats="results/stats/train/{space}.npz",
        valfd="results/stats/valfd.json",
    output:
        "results/eval/{variant}/{space}.json",
    log:
        log_path("evaluate", "{variant}", "{space}"),
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        **slurm_resources("evaluate"),
    shell:
        "{FDPIPE} evaluate --space {wildcards.space} --features {input.features}"
        " --stats {input.stats} --valfd {input.valfd} --out {output} > {log} 2>&1"
