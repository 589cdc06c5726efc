"""The Snakemake workflow: DAG planning, targeted builds, the smoke run end to end."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ALL_RULES = {"prepare_data", "train_encoder", "extract_real", "stats", "valfd", "pretrain",
             "finetune", "sample_base", "sample_run", "extract_generated", "evaluate",
             "aggregate"}


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
               "--directory", str(workdir), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def planned_jobs(output: str) -> dict[str, int]:
    """Parse the job-count table that a dry run prints."""
    counts = {}
    for line in output.splitlines():
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match and match.group(1) not in ("total", "job"):
            counts[match.group(1)] = int(match.group(2))
    return counts


@pytest.fixture()
def smoke_config(tmp_path, fake_fashion_mnist) -> Path:
    config = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    config["data"]["root"] = str(fake_fashion_mnist)
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_dry_run_lists_whole_dag(tmp_path):
    result = snakemake(tmp_path, "-n", "--configfile", str(REPO / "config/config.yaml"))
    jobs = planned_jobs(result.stdout)
    assert set(jobs) == ALL_RULES | {"all"}
    assert jobs["finetune"] == 4
    assert jobs["train_encoder"] == 3
    # 2 base variants + 4 runs, each in 5 spaces.
    assert jobs["evaluate"] == 30


def test_one_target_plans_only_its_stage(tmp_path):
    result = snakemake(tmp_path, "results/stats/train/pixels.npz", "-n", "--configfile",
                       str(REPO / "config/config.yaml"))
    assert planned_jobs(result.stdout) == {"prepare_data": 1, "extract_real": 1, "stats": 1}


def test_misspelt_key_stops_before_jobs(tmp_path):
    config = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    config["finetune"]["runs"]["fd-two"]["setps"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "--configfile", str(path), check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "'setps'" in output
    assert "did you mean 'steps'" in output


def test_missing_dataset_root_named(tmp_path, smoke_config):
    config = yaml.safe_load(smoke_config.read_text())
    missing = tmp_path / "no-such-folder"
    config["data"]["root"] = str(missing)
    smoke_config.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "results/data/test.h5", "--cores", "1", "--configfile",
                       str(smoke_config), check=False)
    assert result.returncode != 0
    log = (tmp_path / "results/logs/prepare_data/test.log").read_text()
    assert str(missing) in log
    assert "data.root" in log
    assert not (tmp_path / "results/data/test.h5").exists()


def test_smoke_end_to_end(tmp_path, smoke_config):
    snakemake(tmp_path, "--cores", "2", "--configfile", str(smoke_config))
    table = tmp_path / "results/tables/fdrk.csv"
    rows = list(csv.DictReader(table.open()))
    assert {r["variant"] for r in rows} == {"base-1step", "base-4step", "fd-classifier",
                                            "fd-two"}
    fdrk = [float(r["fdr_k"]) for r in rows]
    assert fdrk == sorted(fdrk)
    for row in rows:
        assert int(row["n"]) == 200
        for space in ("classifier", "mae", "pixels"):
            assert float(row[f"fd_{space}"]) > 0
    assert (tmp_path / "results/tables/fdrk.md").read_text().startswith("FDr^k")
    assert (tmp_path / "results/figures/fdrk.png").stat().st_size > 1000
    assert (tmp_path / "results/samples/fd-two.png").exists()
    metrics = (tmp_path / "results/runs/fd-two/metrics.jsonl").read_text().splitlines()
    assert len(metrics) >= 2
    # Nothing is left to do: a second invocation plans no job.
    again = snakemake(tmp_path, "-n", "--configfile", str(smoke_config))
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.parametrize("target, runs", [
    ("results/tables/queue_size.md", 5),
    ("results/tables/ema_beta.md", 4),
    ("results/tables/rank_agreement.md", 6),
    ("results/tables/repurpose.md", 2),
])
def test_experiment_target_plans(tmp_path, target, runs):
    result = snakemake(tmp_path, target, "-n", "--configfile", str(REPO / "config/config.yaml"))
    jobs = planned_jobs(result.stdout)
    assert jobs["finetune"] == runs
    rule = "rank_agreement" if "rank_agreement" in target else "experiment_table"
    assert jobs[rule] == 1


def test_external_generator_through_config(tmp_path, fake_fashion_mnist):
    """A generator factory from a test module, named in the config, is fine-tuned."""
    import os

    import torch

    from tests.plugin_generator import build

    torch.save(build(resolution=8).state_dict(), tmp_path / "plugin.pt")
    config = {
        "device": "cpu",
        "data": {"root": str(fake_fashion_mnist), "resolution": 8, "train_subset": 200,
                 "test_subset": 100},
        "spaces": {"pixels": {"family": "pixels", "options": {"size": 4}}},
        "evaluation": {"num_samples": 100, "batch_size": 50},
        "generator": {"factory": "tests.plugin_generator:build",
                      "checkpoint": str(tmp_path / "plugin.pt"), "options": {"resolution": 8},
                      "base_steps": [1]},
        "finetune": {"defaults": {"steps": 3, "batch_size": 32, "fill_samples": 64,
                                  "log_every": 1},
                     "runs": {"fd-pixels": {"spaces": ["pixels"]}}},
    }
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
               str(tmp_path), "results/samples/fd-pixels.h5", "--cores", "2", "--configfile",
               str(path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pretrain" not in result.stdout + result.stderr
    checkpoint = torch.load(tmp_path / "results/runs/fd-pixels/generator.pt",
                            weights_only=False)
    assert checkpoint["generator"]["factory"] == "tests.plugin_generator:build"
    assert checkpoint["step"] == 3
    metrics = (tmp_path / "results/runs/fd-pixels/metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 3
