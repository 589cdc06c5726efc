# Reference statistics per (split, space) and the FDr normalisers.
#
# With evaluation.shards = 1, one stats job reads the feature file of
# extract_real. With more, extract_shard jobs each write the float64 moments
# of one contiguous range of the images, and merge_stats merges them into the
# same statistics (no feature file is written for them).

SHARDS = CFG["evaluation"]["shards"]


if SHARDS == 1:

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
            **slurm_resources("stats"),
        shell:
            "{FDPIPE} stats --features {input} --out {output} > {log} 2>&1"

else:

    rule extract_shard:
        input:
            images=REAL_IMAGES,
            weights=lambda w: space_weights(w.space),
        output:
            f"results/stats/{{split}}/shards/{{space}}/{{shard}}-of-{SHARDS}.npz",
        params:
            spec=lambda w: spec_arg(space_spec(w.space)),
            batch_size=CFG["evaluation"]["batch_size"],
        log:
            log_path("extract_shard", "{split}", "{space}", f"{{shard}}-of-{SHARDS}"),
        benchmark:
            bench_path("extract_shard", "{split}", "{space}", f"{{shard}}-of-{SHARDS}")
        wildcard_constraints:
            shard=r"\d+",
        threads: res("extract_shard", "threads")
        resources:
            mem_mb=res("extract_shard", "mem_mb"),
            runtime=res("extract_shard", "runtime"),
            gpu=res("extract_shard", "gpu"),
            **slurm_resources("extract_shard"),
        shell:
            "{FDPIPE} extract-shard --space {wildcards.space} --spec {params.spec}"
            " --images {input.images} --shard {wildcards.shard} --shards {SHARDS}"
            " --batch-size {params.batch_size} --device {DEVICE} --threads {threads}"
            " {SKIP_BAD_IMAGES} --out {output} > {log} 2>&1"

    rule merge_stats:
        input:
            expand(
                "results/stats/{{split}}/shards/{{space}}/{shard}-of-{shards}.npz",
                shard=range(SHARDS),
                shards=SHARDS,
            ),
        output:
            "results/stats/{split}/{space}.npz",
        log:
            log_path("merge_stats", "{split}", "{space}"),
        threads: res("merge_stats", "threads")
        resources:
            mem_mb=res("merge_stats", "mem_mb"),
            runtime=res("merge_stats", "runtime"),
            **slurm_resources("merge_stats"),
        shell:
            "{FDPIPE} merge-stats --shards {input} --out {output} > {log} 2>&1"


rule valfd:
    input:
        features=expand("results/features/real/test/{space}.h5", space=EVAL_SPACES),
        stats=expand("results/stats/train/{space}.npz", space=EVAL_SPACES),
    output:
        "results/stats/valfd.json",
    params:
        spaces=" ".join(EVAL_SPACES),
        published=(
            "--published " + spec_arg({s: CFG["evaluation"]["published_normalisers"][s]
                                       for s in EVAL_SPACES})
            if CFG["evaluation"]["normalisers"] == "published" else ""
        ),
    log:
        log_path("valfd", "valfd"),
    threads: res("valfd", "threads")
    resources:
        mem_mb=res("valfd", "mem_mb"),
        runtime=res("valfd", "runtime"),
        **slurm_resources("valfd"),
    shell:
        "{FDPIPE} valfd --spaces {params.spaces} --features {input.features}"
        " --stats {input.stats} {params.published} --out {output} > {log} 2>&1"
