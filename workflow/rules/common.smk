# Config validation, wildcard constraints, resources and input functions.

import json
import re
import shlex
import sys

from snakemake.exceptions import WorkflowError

from fdpipe.config import ConfigError, run_defaults, space_weights_path, validate_config
from fdpipe.experiments import expand_experiments

try:
    CFG = validate_config(config, source="the Snakemake config")
except ConfigError as err:
    raise WorkflowError(str(err)) from None

FDPIPE = f"{shlex.quote(sys.executable)} -m fdpipe"
SEED = CFG["seed"]
DEVICE = CFG["device"]
SPACES = CFG["spaces"]
EVAL_SPACES = CFG["evaluation"]["spaces"]
FDRK_SPACES = CFG["evaluation"]["fdrk_spaces"]
RUNS = CFG["finetune"]["runs"]
BASE_STEPS = CFG["generator"]["base_steps"]
BASE_VARIANTS = [f"base-{n}step" for n in BASE_STEPS]
VARIANTS = BASE_VARIANTS + list(RUNS)
# Experiment sets add runs and base variants that only their tables ask for.
EXPERIMENTS = expand_experiments(CFG, run_defaults())
ALL_RUNS = {**RUNS, **{r: s for e in EXPERIMENTS.values() for r, s in e.runs.items()}}
ALL_VARIANTS = sorted(set(VARIANTS) | {v for e in EXPERIMENTS.values() for v in e.variants})
TRAINED_SPACES = [s for s, v in SPACES.items() if v["family"] in ("classifier", "mae", "simclr")
                  and not v.get("weights")]
# fashion-mnist is written to .h5 image files; image folders and ADM .npz
# batches get a checked manifest (file list and labels) instead of a pixel copy.
DATASET = CFG["data"]["dataset"]
REAL_IMAGES = ("results/data/{split}.h5" if DATASET == "fashion-mnist"
               else "results/data/{split}.manifest.json")
SKIP_BAD_IMAGES = "--skip-bad-images" if CFG["data"]["skip_bad_images"] else ""
EXTERNAL_BASE = CFG["generator"]["checkpoint"]
BASE_CHECKPOINT = EXTERNAL_BASE or "results/generators/base.pt"

for _run in RUNS:
    if _run.startswith("base-") or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", _run):
        raise WorkflowError(
            f"finetune.runs.{_run}: run names use letters, digits, '-', '_', '.' and '+' and "
            f"must not start with 'base-'"
        )


def _alternatives(names):
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


wildcard_constraints:
    split="train|test",
    space=_alternatives(SPACES),
    trained_space=_alternatives(TRAINED_SPACES),
    run=_alternatives(ALL_RUNS),
    variant=_alternatives(ALL_VARIANTS),
    experiment=_alternatives(EXPERIMENTS),
    steps=r"\d+",


# Per-rule defaults: threads, memory (MB), runtime (minutes) and GPUs. Any of
# them can be overridden under `resources.<rule>` in the config, which also
# takes the SLURM partition, GPU model and GRES (see slurm_resources).
GPU_RULES = {"train_encoder", "extract_real", "extract_generated", "pretrain", "finetune",
             "sample_base", "sample_run", "extract_shard"}
DEFAULT_RESOURCES = {
    "prepare_data": {"threads": 1, "mem_mb": 2000, "runtime": 10},
    "train_encoder": {"threads": 2, "mem_mb": 4000, "runtime": 60},
    "extract_real": {"threads": 1, "mem_mb": 4000, "runtime": 60},
    "extract_generated": {"threads": 1, "mem_mb": 4000, "runtime": 60},
    "stats": {"threads": 1, "mem_mb": 2000, "runtime": 10},
    "valfd": {"threads": 1, "mem_mb": 2000, "runtime": 10},
    "pretrain": {"threads": 2, "mem_mb": 4000, "runtime": 120},
    "finetune": {"threads": 1, "mem_mb": 4000, "runtime": 120},
    "sample_base": {"threads": 1, "mem_mb": 4000, "runtime": 60},
    "sample_run": {"threads": 1, "mem_mb": 4000, "runtime": 60},
    "evaluate": {"threads": 1, "mem_mb": 2000, "runtime": 10},
    "aggregate": {"threads": 1, "mem_mb": 1000, "runtime": 10},
    "experiment_table": {"threads": 1, "mem_mb": 1000, "runtime": 10},
    "rank_agreement": {"threads": 1, "mem_mb": 1000, "runtime": 10},
    "extract_shard": {"threads": 1, "mem_mb": 4000, "runtime": 60},
    "merge_stats": {"threads": 1, "mem_mb": 2000, "runtime": 10},
}

_unknown_rules = sorted(set(CFG["resources"]) - set(DEFAULT_RESOURCES))
if _unknown_rules:
    raise WorkflowError(
        f"resources: no rule named {_unknown_rules}; rules with resources are "
        f"{sorted(DEFAULT_RESOURCES)}"
    )


def res(rule_name, key):
    value = CFG["resources"].get(rule_name, {}).get(key)
    if value is not None:
        return value
    if key == "gpu":
        # With device: cpu no stage uses a GPU, so none is requested.
        return 1 if rule_name in GPU_RULES and DEVICE != "cpu" else 0
    return DEFAULT_RESOURCES[rule_name][key]


# Config keys under resources.<rule> that name SLURM settings, and the
# resource names the SLURM executor plugin reads them from.
SLURM_RESOURCE_KEYS = {"partition": "slurm_partition", "gpu_model": "gpu_model", "gres": "gres"}
# Every rule's `resources:` include slurm_resources(rule).
SLURM_KEY_RULES = set(DEFAULT_RESOURCES)

for _rule, _settings in CFG["resources"].items():
    _slurm_keys = sorted(k for k in SLURM_RESOURCE_KEYS if _settings.get(k) is not None)
    if _slurm_keys and _rule not in SLURM_KEY_RULES:
        raise WorkflowError(
            f"resources.{_rule}: {_slurm_keys} can be set per rule only for "
            f"{sorted(SLURM_KEY_RULES)}; for {_rule} set slurm_partition (or gpu_model, gres) "
            f"under default-resources in the SLURM profile"
        )


def slurm_resources(rule_name):
    """SLURM-only resources of a rule set in the config, for `resources: **slurm_resources(...)`.

    Unset keys are left out, so a profile's default-resources (such as a
    default slurm_partition) still applies to them.
    """
    settings = CFG["resources"].get(rule_name, {})
    return {name: settings[key] for key, name in SLURM_RESOURCE_KEYS.items()
            if settings.get(key) is not None}


def spec_arg(payload):
    """Shell-quoted JSON; as a param it makes Snakemake rerun jobs when it changes."""
    return shlex.quote(json.dumps(payload, sort_keys=True))


def space_spec(name):
    space = dict(SPACES[name])
    space["weights"] = space_weights_path(name, space)
    return space


def space_weights(name):
    path = space_weights_path(name, SPACES[name])
    return [path] if path else []


def log_path(rule_name, *parts):
    return f"results/logs/{rule_name}/" + "/".join(parts) + ".log"


def bench_path(rule_name, *parts):
    return f"results/benchmarks/{rule_name}/" + "/".join(parts) + ".tsv"
