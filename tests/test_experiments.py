import itertools
import json

import numpy as np
import pytest

from fdpipe.config import ConfigError, run_defaults, validate_config
from fdpipe.experiments import expand_experiments
from fdpipe.report import experiment_table, rank_agreement

BASE = {
    "spaces": {"a": {"family": "pixels"}, "b": {"family": "pixels", "options": {"size": 8}}},
    "finetune": {"defaults": {"steps": 50, "batch_size": 32},
                 "runs": {"fd-a": {"spaces": ["a"]}}},
}


def config_with(experiments):
    return validate_config({**BASE, "experiments": experiments})


def test_queue_size_runs():
    config = config_with({"queue_size": {"spaces": ["a"], "values": [0, 64, 500]}})
    sets = expand_experiments(config, run_defaults())
    runs = sets["queue_size"].runs
    assert list(runs) == ["queue-0", "queue-64", "queue-500"]
    assert runs["queue-500"]["method"] == "queue"
    assert runs["queue-500"]["queue_size"] == 500
    # The queue must be fillable: fill_samples grows to the queue size.
    assert runs["queue-500"]["fill_samples"] >= 500
    # finetune.defaults apply, schema defaults fill the rest.
    assert runs["queue-64"]["steps"] == 50
    assert runs["queue-64"]["lr"] == run_defaults()["lr"]
    # The caption's fixed settings leave out what the set varies.
    fixed = sets["queue_size"].fixed
    assert "queue_size" not in fixed
    assert fixed["method"] == "queue"
    assert fixed["steps"] == 50
    assert "log_every" not in fixed


def test_set_settings_override_defaults():
    config = config_with({"ema_beta": {"spaces": ["b"], "values": [0.9, 0.999],
                                       "settings": {"steps": 7}}})
    runs = expand_experiments(config, run_defaults())["ema_beta"].runs
    assert list(runs) == ["beta-0.9", "beta-0.999"]
    assert runs["beta-0.999"]["beta"] == 0.999
    assert runs["beta-0.9"]["steps"] == 7
    assert runs["beta-0.9"]["batch_size"] == 32


def test_spaces_and_repurpose_sets():
    config = config_with({"spaces": {"sets": [["a"], ["a", "b"]]},
                          "repurpose": {"base_steps": [1, 4], "runs": ["fd-a"]}})
    sets = expand_experiments(config, run_defaults())
    assert list(sets["spaces"].runs) == ["spaces-a", "spaces-a+b"]
    assert sets["spaces"].runs["spaces-a+b"]["spaces"] == ["a", "b"]
    assert sets["repurpose"].variants == ["base-1step", "base-4step", "fd-a"]
    assert sets["repurpose"].runs == {}


@pytest.mark.parametrize("experiments, fragment", [
    ({"queue_size": {"spaces": ["zz"], "values": [0]}}, "experiments.queue_size.spaces"),
    ({"spaces": {"sets": [["a"], ["a", "q"]]}}, "experiments.spaces.sets names 'q'"),
    ({"repurpose": {"base_steps": [1], "runs": ["fd-zz"]}}, "experiments.repurpose.runs"),
    ({"queue_size": {"spaces": ["a"], "values": [10]}}, "smaller than the batch size 32"),
    ({"ema_beta": {"spaces": ["a"], "values": [1.0]}}, "experiments.ema_beta.values.0"),
    ({"queue_sise": {}}, "did you mean 'queue_size'"),
])
def test_invalid_experiments_named(experiments, fragment):
    with pytest.raises(ConfigError) as err:
        config_with(experiments)
    assert fragment in str(err.value)


def write_evals(tmp_path, scores):
    """scores: {variant: {space: fd}}; validation FD is 1 in every space."""
    files = []
    for variant, by_space in scores.items():
        for space, fd in by_space.items():
            path = tmp_path / "eval" / variant / f"{space}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"space": space, "fd": fd, "fdr": fd, "n": 100,
                                        "valfd": 1.0}))
            files.append(path)
    return files


def brute_force_tau(x, y):
    concordant = discordant = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sign = np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
        concordant += sign > 0
        discordant += sign < 0
    return (concordant - discordant) / (len(x) * (len(x) - 1) / 2)


def test_rank_agreement_matches_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    scores = {f"run{i}": {"s1": float(rng.uniform(1, 9)), "s2": float(rng.uniform(1, 9)),
                          "s3": float(rng.uniform(1, 9))} for i in range(6)}
    files = write_evals(tmp_path, scores)
    matrix = rank_agreement(files, ["s1", "s2", "s3"], ["s1", "s2", "s3"],
                            tmp_path / "r.csv", tmp_path / "r.md")
    runs = sorted(scores)
    for a, b in itertools.product(["s1", "s2", "s3"], repeat=2):
        expected = brute_force_tau([scores[r][a] for r in runs], [scores[r][b] for r in runs])
        assert matrix[a][b] == pytest.approx(expected, abs=1e-12)
    assert matrix["s1"]["s1"] == pytest.approx(1.0)
    assert "Kendall tau" in (tmp_path / "r.md").read_text()


def test_reversed_rankings_give_minus_one(tmp_path):
    scores = {f"run{i}": {"s1": float(i), "s2": float(10 - i)} for i in range(4)}
    files = write_evals(tmp_path, scores)
    matrix = rank_agreement(files, ["s1", "s2"], ["s1"], tmp_path / "r.csv", tmp_path / "r.md")
    assert matrix["s1"]["s2"] == pytest.approx(-1.0)


def test_experiment_table_keeps_set_order(tmp_path):
    scores = {"queue-0": {"s1": 5.0}, "queue-100": {"s1": 2.0}, "queue-1000": {"s1": 1.0}}
    files = write_evals(tmp_path, scores)
    rows = experiment_table("queue_size", "queue size",
                            {"queue-0": 0, "queue-100": 100, "queue-1000": 1000},
                            {"spaces": ["s1"], "steps": 10}, files, ["s1"], ["s1"],
                            tmp_path / "t.csv", tmp_path / "t.md", tmp_path / "t.png")
    assert [r["variant"] for r in rows] == ["queue-0", "queue-100", "queue-1000"]
    text = (tmp_path / "t.md").read_text()
    assert "varied queue size" in text
    assert "steps = 10" in text
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "variant,queue size,n,fdr_k,fd_s1"
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_repurpose_table_has_cost_column(tmp_path):
    files = write_evals(tmp_path, {"base-1step": {"s1": 9.0}, "base-8step": {"s1": 2.0},
                                   "fd-a": {"s1": 1.5}})
    rows = experiment_table("repurpose", "sampler",
                            {"base-1step": 1, "base-8step": 8, "fd-a": "FD-loss, 1"}, {},
                            files, ["s1"], ["s1"], tmp_path / "t.csv", tmp_path / "t.md",
                            costs={"base-1step": 1, "base-8step": 8, "fd-a": 1})
    assert [r["nfe_per_image"] for r in rows] == [1, 8, 1]
    assert "nfe_per_image" in (tmp_path / "t.md").read_text()
