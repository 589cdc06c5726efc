"""Experiment sets: controlled variations of FD-loss runs, each with one table.

- ``queue_size``: queue statistics of several sizes (0 = batch statistics only);
- ``ema_beta``: EMA statistics with several decays;
- ``spaces``: training on single spaces and combinations, evaluated in all;
- ``repurpose``: the multi-step base model at several step counts against
  one-step FD-loss runs, with the sampling cost per image.

Each set expands into named runs that share the ``finetune`` rule with the
main runs. The set's table lists what was varied and what was held fixed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

EXPERIMENT_SETS = ("queue_size", "ema_beta", "spaces", "repurpose")


@dataclass(frozen=True)
class ExperimentSet:
    """Runs and base variants of one set, with the varied setting per row."""

    name: str
    varied: str
    rows: dict[str, Any]                      # variant -> value of the varied setting
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def variants(self) -> list[str]:
        return list(self.rows)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# Settings that do not change the numbers, left out of the "fixed" caption.
BOOKKEEPING = ("log_every", "checkpoint_every", "max_consecutive_skips")


def _fixed(settings: dict[str, Any], varied: tuple[str, ...], **extra: Any) -> dict[str, Any]:
    """Settings held fixed across a set: all but the varied and bookkeeping ones."""
    fixed = {k: v for k, v in settings.items() if k not in varied + BOOKKEEPING}
    return {**fixed, **extra}


def _run_settings(config: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    base = copy.deepcopy(config["finetune"].get("defaults", {}))
    base.update(copy.deepcopy(spec.get("settings", {})))
    return base


def expand_experiments(config: dict[str, Any], run_defaults: dict[str, Any]
                       ) -> dict[str, ExperimentSet]:
    """Expand ``config['experiments']`` into experiment sets with fully specified runs.

    ``run_defaults`` contains the schema defaults of one run. Settings given in
    the set override ``finetune.defaults``, which override ``run_defaults``.
    """
    sets: dict[str, ExperimentSet] = {}
    experiments = config.get("experiments", {})

    def complete(settings: dict[str, Any]) -> dict[str, Any]:
        return {**copy.deepcopy(run_defaults), **settings}

    spec = experiments.get("queue_size")
    if spec:
        settings = _run_settings(config, spec)
        runs, rows = {}, {}
        for size in spec["values"]:
            name = f"queue-{size}"
            fill = max(settings.get("fill_samples", run_defaults["fill_samples"]), size)
            runs[name] = complete({**settings, "spaces": spec["spaces"], "method": "queue",
                                   "queue_size": size, "fill_samples": fill})
            rows[name] = size
        fixed = _fixed(settings, ("method", "queue_size", "fill_samples", "beta", "spaces"),
                       method="queue", spaces=spec["spaces"])
        sets["queue_size"] = ExperimentSet("queue_size", "queue size", rows, runs, fixed)

    spec = experiments.get("ema_beta")
    if spec:
        settings = _run_settings(config, spec)
        runs, rows = {}, {}
        for beta in spec["values"]:
            name = f"beta-{_format_value(beta)}"
            runs[name] = complete({**settings, "spaces": spec["spaces"], "method": "ema",
                                   "beta": beta})
            rows[name] = beta
        fixed = _fixed(settings, ("method", "queue_size", "beta", "spaces"), method="ema",
                       spaces=spec["spaces"])
        sets["ema_beta"] = ExperimentSet("ema_beta", "EMA beta", rows, runs, fixed)

    spec = experiments.get("spaces")
    if spec:
        settings = _run_settings(config, spec)
        runs, rows = {}, {}
        for combination in spec["sets"]:
            name = "spaces-" + "+".join(combination)
            runs[name] = complete({**settings, "spaces": list(combination)})
            rows[name] = "+".join(combination)
        sets["spaces"] = ExperimentSet("spaces", "training spaces", rows, runs,
                                       _fixed(settings, ("spaces", "weights")))

    spec = experiments.get("repurpose")
    if spec:
        rows = {f"base-{n}step": n for n in spec["base_steps"]}
        for run in spec["runs"]:
            rows[run] = "FD-loss, 1"
        sets["repurpose"] = ExperimentSet("repurpose", "sampler", rows, {},
                                          {"base_steps": spec["base_steps"],
                                           "runs": spec["runs"]})
    return sets
