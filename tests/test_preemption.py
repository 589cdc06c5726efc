"""SIGTERM to a running FD-loss job under Snakemake, then a rerun that resumes.

SLURM sends the signal of `--signal` (and SIGTERM at the time limit) to every
process of a job step. The test sends SIGTERM to the process group of a real
Snakemake run of the smoke config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fdpipe.train import PREEMPTED_EXIT_CODE
from tests.test_workflow import snakemake

REPO = Path(__file__).resolve().parents[1]
STEPS = 150
RUN = {"spaces": ["classifier"], "steps": STEPS, "log_every": 1, "checkpoint_every": 1000}


@pytest.fixture()
def two_run_config(tmp_path, fake_fashion_mnist) -> Path:
    """The smoke config with two identical runs: one to interrupt, one to compare with."""
    config = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    config["data"]["root"] = str(fake_fashion_mnist)
    config["finetune"]["runs"] = {"whole": dict(RUN), "stopped": dict(RUN)}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_for_line(path: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        if process.poll() is not None:
            raise AssertionError(f"Snakemake exited with {process.returncode} before {path} "
                                 f"contained {text!r}")
        time.sleep(0.2)
    raise AssertionError(f"{path} did not contain {text!r} within {timeout} s")


def last_metrics(workdir: Path, run: str) -> dict:
    lines = (workdir / f"results/runs/{run}/metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


@pytest.mark.slow
def test_sigterm_then_rerun_resumes(tmp_path, two_run_config):
    config = ["--configfile", str(two_run_config)]
    snakemake(tmp_path, "--cores", "2", "results/runs/whole/generator.pt", *config)

    target = "results/runs/stopped/generator.pt"
    log = tmp_path / "results/logs/finetune/stopped.log"
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
               str(tmp_path), "--cores", "2", target, *config]
    # A new session, so the signal goes to Snakemake and the training process
    # alike, as SLURM signals every process of a job step.
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_line(log, "step 20:", process, timeout=300)
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    assert process.returncode != 0, output[-3000:]
    assert f"exit status {PREEMPTED_EXIT_CODE}" in output, output[-3000:]
    assert f"received signal {int(signal.SIGTERM)}" in log.read_text()
    checkpoint = tmp_path / "results/runs/stopped/checkpoint.pt"
    assert checkpoint.exists()
    assert not (tmp_path / target).exists()

    snakemake(tmp_path, "--cores", "2", target, *config)
    resumed_log = log.read_text()
    assert "resumed from" in resumed_log
    resumed_at = int(resumed_log.split("resumed from")[1].split("at step ")[1].split()[0])
    assert 20 <= resumed_at < STEPS
    assert not checkpoint.exists()

    whole, stopped = last_metrics(tmp_path, "whole"), last_metrics(tmp_path, "stopped")
    assert stopped["step"] == whole["step"] == STEPS
    fd_whole, fd_stopped = whole["fd"]["classifier"], stopped["fd"]["classifier"]
    # The same seed and settings on the same machine: the resumed run follows the
    # uninterrupted one, up to round-off.
    assert abs(fd_stopped - fd_whole) <= 1e-6 * abs(fd_whole)
    assert abs(stopped["loss"] - whole["loss"]) <= 1e-6 * abs(whole["loss"])
