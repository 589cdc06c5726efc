"""Configuration: JSON-schema validation with defaults, plus cross-key checks.

The Snakefile and the command line both go through ``validate_config`` so a
misspelt key or an out-of-range value stops before any job runs.
"""

from __future__ import annotations

import copy
import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DEMO_TRAINED = ("classifier", "mae", "simclr")


class ConfigError(ValueError):
    """Raised for an invalid configuration; the message names the key."""


def load_schema() -> dict[str, Any]:
    text = resources.files("fdpipe").joinpath("schemas/config.schema.yaml").read_text()
    return yaml.safe_load(text)


def _extend_with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_DefaultingValidator = _extend_with_defaults(jsonschema.Draft202012Validator)


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def _allowed_keys(schema: dict[str, Any], root: dict[str, Any]) -> list[str]:
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
    keys = list(schema.get("properties", {}))
    for sub in schema.get("allOf", []):
        keys += _allowed_keys(sub, root)
    return keys


def _describe(error: jsonschema.ValidationError, root: dict[str, Any]) -> str:
    where = _key_path(error)
    if error.validator == "additionalProperties":
        allowed = _allowed_keys(error.schema, root)
        extra = [k for k in error.instance if k not in allowed]
        hints = []
        for key in extra:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            hints.append(f"'{key}'{hint}")
        return (f"unknown key {', '.join(hints)} under {where}; allowed keys: "
                f"{', '.join(sorted(allowed))}")
    if error.validator == "enum":
        return (f"{where} = {error.instance!r} is not allowed; use one of "
                f"{', '.join(map(repr, error.validator_value))}")
    if error.validator == "type":
        return f"{where} = {error.instance!r} has the wrong type; expected {error.validator_value}"
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"{where} = {error.instance!r} is out of range ({error.validator} {error.validator_value})"
    if error.validator == "required":
        return f"{where}: {error.message}"
    return f"{where}: {error.message}"


def validate_config(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Return a validated deep copy of ``config`` with defaults filled in."""
    config = copy.deepcopy(config)
    _merge_run_defaults(config)
    schema = load_schema()
    validator = _DefaultingValidator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n  ".join(_describe(e, schema) for e in errors)
        raise ConfigError(f"invalid configuration in {source}:\n  {lines}")
    _check_cross_references(config, source)
    _apply_data_root(config)
    _check_image_data(config, source)
    _check_experiments(config, source)
    return config


def _apply_data_root(config: dict[str, Any]) -> None:
    """Let the top-level data_root override data.root (for `--config data_root=...`)."""
    if config.get("data_root"):
        config["data"]["root"] = str(config["data_root"])


def _check_image_data(config: dict[str, Any], source: str) -> None:
    """Checks for the imagefolder/npz data path and the FDr normaliser switch."""
    dataset = config["data"]["dataset"]
    if dataset != "fashion-mnist":
        if config["data"]["root"] == "auto":
            raise ConfigError(f"{source}: data.dataset = {dataset!r} needs data.root (or "
                              f"data_root) set to the folder that holds the data; 'auto' only "
                              f"locates Fashion-MNIST")
        if not config["generator"]["checkpoint"]:
            raise ConfigError(f"{source}: data.dataset = {dataset!r} needs an external generator "
                              f"(generator.checkpoint); the built-in flow model trains only on "
                              f"fashion-mnist image files")
        subsets = [f"data.{k}" for k in ("train_subset", "test_subset") if config["data"][k]]
        if subsets:
            raise ConfigError(f"{source}: {', '.join(subsets)} must be null for data.dataset = "
                              f"{dataset!r}; pick the images by pointing data.splits at them")
        trained = [n for n, s in config["spaces"].items()
                   if s["family"] in DEMO_TRAINED and not s.get("weights")]
        if trained:
            raise ConfigError(f"{source}: spaces {trained} would be trained by the pipeline, "
                              f"which needs fashion-mnist data; set spaces.<name>.weights or "
                              f"use inception/timm spaces with data.dataset = {dataset!r}")
    evaluation = config["evaluation"]
    if evaluation["normalisers"] == "published":
        missing = [n for n in evaluation["spaces"] if n not in evaluation["published_normalisers"]]
        if missing:
            raise ConfigError(f"{source}: evaluation.normalisers is 'published' but "
                              f"evaluation.published_normalisers has no value for {missing}")


def _merge_run_defaults(config: dict[str, Any]) -> None:
    """Apply finetune.defaults to every run before the schema fills the rest."""
    finetune = config.get("finetune")
    if not isinstance(finetune, dict):
        return
    defaults = finetune.get("defaults") or {}
    runs = finetune.get("runs") or {}
    if not isinstance(defaults, dict) or not isinstance(runs, dict):
        return
    for name, run in runs.items():
        if isinstance(run, dict):
            runs[name] = {**copy.deepcopy(defaults), **run}
    experiments = config.get("experiments")
    if isinstance(experiments, dict):
        for spec in experiments.values():
            if isinstance(spec, dict) and isinstance(spec.get("settings", {}), dict):
                if "settings" in spec or "spaces" in spec or "sets" in spec:
                    spec["settings"] = {**copy.deepcopy(defaults), **spec.get("settings", {})}


def _check_cross_references(config: dict[str, Any], source: str) -> None:
    from fdpipe.spaces import families

    spaces = config["spaces"]
    known = families()
    for name, space in spaces.items():
        if space["family"] not in known:
            raise ConfigError(f"{source}: spaces.{name}.family = {space['family']!r} is not a "
                              f"known family; use one of {', '.join(known)}")
    evaluation = config["evaluation"]
    if evaluation["spaces"] is None:
        evaluation["spaces"] = list(spaces)
    if evaluation["fdrk_spaces"] is None:
        evaluation["fdrk_spaces"] = list(evaluation["spaces"])
    for key in ("spaces", "fdrk_spaces"):
        for name in evaluation[key]:
            if name not in spaces:
                raise ConfigError(f"{source}: evaluation.{key} names space {name!r}, which is "
                                  f"not under spaces (have {', '.join(spaces)})")
    for name in evaluation["fdrk_spaces"]:
        if name not in evaluation["spaces"]:
            raise ConfigError(f"{source}: evaluation.fdrk_spaces names {name!r}, which is not "
                              f"in evaluation.spaces")
    for run_name, run in config["finetune"]["runs"].items():
        for name in list(run["spaces"]) + list(run.get("weights", {})):
            if name not in spaces:
                raise ConfigError(f"{source}: finetune.runs.{run_name} names space {name!r}, "
                                  f"which is not under spaces (have {', '.join(spaces)})")
        if run["method"] == "queue" and run["queue_size"] > 0 and \
                run["queue_size"] < run["batch_size"]:
            raise ConfigError(f"{source}: finetune.runs.{run_name}.queue_size "
                              f"({run['queue_size']}) must be 0 or at least batch_size "
                              f"({run['batch_size']})")
        if run["method"] == "queue" and run["fill_samples"] < run["queue_size"]:
            raise ConfigError(f"{source}: finetune.runs.{run_name}.fill_samples "
                              f"({run['fill_samples']}) must be at least queue_size "
                              f"({run['queue_size']}) to fill the queue")
        bad = [v for v in run.get("weights", {}) if v not in run["spaces"]]
        if bad:
            raise ConfigError(f"{source}: finetune.runs.{run_name}.weights names {bad}, which "
                              f"are not in its spaces {run['spaces']}")


def run_defaults() -> dict[str, Any]:
    """Schema defaults of one FD-loss run."""
    settings = load_schema()["$defs"]["finetune_settings"]["properties"]
    return {k: copy.deepcopy(v["default"]) for k, v in settings.items() if "default" in v}


def _check_experiments(config: dict[str, Any], source: str) -> None:
    from fdpipe.experiments import expand_experiments

    spaces = config["spaces"]
    experiments = config["experiments"]
    for set_name in ("queue_size", "ema_beta"):
        for name in (experiments.get(set_name) or {}).get("spaces", []):
            if name not in spaces:
                raise ConfigError(f"{source}: experiments.{set_name}.spaces names {name!r}, "
                                  f"which is not under spaces (have {', '.join(spaces)})")
    for combination in (experiments.get("spaces") or {}).get("sets", []):
        for name in combination:
            if name not in spaces:
                raise ConfigError(f"{source}: experiments.spaces.sets names {name!r}, which is "
                                  f"not under spaces (have {', '.join(spaces)})")
    for run in (experiments.get("repurpose") or {}).get("runs", []):
        if run not in config["finetune"]["runs"]:
            raise ConfigError(f"{source}: experiments.repurpose.runs names {run!r}, which is "
                              f"not under finetune.runs (have "
                              f"{', '.join(config['finetune']['runs'])})")
    batch = (experiments.get("queue_size") or {}).get("settings", {}).get(
        "batch_size", config["finetune"]["defaults"].get("batch_size", 256))
    for size in (experiments.get("queue_size") or {}).get("values", []):
        if 0 < size < batch:
            raise ConfigError(f"{source}: experiments.queue_size.values has {size}, smaller "
                              f"than the batch size {batch}; use 0 or at least {batch}")
    for experiment in expand_experiments(config, run_defaults()).values():
        for run in experiment.runs:
            if run in config["finetune"]["runs"]:
                raise ConfigError(f"{source}: experiment run name {run!r} is also under "
                                  f"finetune.runs; rename that run")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    config = yaml.safe_load(path.read_text()) or {}
    if overrides:
        config.update(overrides)
    return validate_config(config, source=str(path))


def space_weights_path(name: str, space: dict[str, Any], results: str = "results") -> str | None:
    """Weights file of a space: its configured path, or the pipeline's encoder file."""
    if space.get("weights"):
        return space["weights"]
    if space["family"] in DEMO_TRAINED:
        return f"{results}/encoders/{name}.pt"
    return None
