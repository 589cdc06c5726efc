# Demo representation spaces trained on the train split.


rule train_encoder:
    input:
        train="results/data/train.h5",
        test="results/data/test.h5",
    output:
        "results/encoders/{trained_space}.pt",
    params:
        spec=lambda w: spec_arg(SPACES[w.trained_space]),
    log:
        log_path("train_encoder", "{trained_space}"),
    benchmark:
        bench_path("train_encoder", "{trained_space}")
    threads: res("train_encoder", "threads")
    resources:
        mem_mb=res("train_encoder", "mem_mb"),
        runtime=res("train_encoder", "runtime"),
        gpu=res("train_encoder", "gpu"),
        **slurm_resources("train_encoder"),
    shell:
        "{FDPIPE} train-encoder --space {wildcards.trained_space} --spec {params.spec}"
        " --train {input.train} --test {input.test} --seed {SEED} --threads {threads}"
        " --out {output} > {log} 2>&1"
