"""Interrupted jobs: SIGKILL at random points, then a rerun gives the same outputs."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def kill_config(tmp_path: Path, fake_root: Path) -> Path:
    """A smaller smoke config whose one FD-loss run checkpoints every 5 of 30 steps."""
    config = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    config["data"]["root"] = str(fake_root)
    config["spaces"] = {k: v for k, v in config["spaces"].items() if k in ("classifier", "pixels")}
    config["generator"]["base_steps"] = [1]
    config["finetune"]["defaults"].update({"steps": 30, "checkpoint_every": 5, "log_every": 5})
    config["finetune"]["runs"] = {"fd-classifier": {"spaces": ["classifier"]}}
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_snakemake(workdir: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--cores", "2", "--configfile", str(config), *extra]
    return subprocess.run(command, capture_output=True, text=True)


def find_stage(stage: str, workdir: Path) -> int | None:
    """Return the pid of a `python -m fdpipe <stage>` process running in ``workdir``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if b"fdpipe" in argv and stage.encode() in argv and b"-m" in argv and cwd == workdir:
            return int(entry.name)
    return None


def exited(pid: int) -> bool:
    """True when the process has finished (a zombie waiting for its parent) or is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


class Killer(threading.Thread):
    """Sends SIGKILL to each named stage of ``workdir`` once, a random time after it starts."""

    def __init__(self, stages: list[str], workdir: Path, seed: int, max_delay: float):
        super().__init__(daemon=True)
        self.stages = list(stages)
        self.workdir = workdir.resolve()
        self.rng = random.Random(seed)
        self.max_delay = max_delay
        self.killed: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while self.stages and not self.stop.is_set():
            for stage in list(self.stages):
                pid = find_stage(stage, self.workdir)
                if pid is None:
                    continue
                time.sleep(self.rng.uniform(0.2, self.max_delay))
                if find_stage(stage, self.workdir) == pid and not exited(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append(stage)
                    except ProcessLookupError:
                        pass
                self.stages.remove(stage)
            time.sleep(0.05)


def output_files(workdir: Path) -> dict[str, bytes]:
    names = ["results/tables/fdrk.csv", "results/stats/valfd.json",
             "results/runs/fd-classifier/metrics.jsonl"]
    return {name: (workdir / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fake_fashion_mnist):
    workdir = tmp_path_factory.mktemp("straight")
    config = kill_config(workdir, fake_fashion_mnist)
    result = run_snakemake(workdir, config)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_files(workdir)


KILL_SEEDS = [int(s) for s in os.environ.get("FDPIPE_KILL_SEEDS", "1,2,3").split(",")]


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_sigkill_then_rerun_matches(tmp_path, fake_fashion_mnist, uninterrupted, seed):
    config = kill_config(tmp_path, fake_fashion_mnist)
    killer = Killer(["extract", "finetune"], tmp_path, seed=seed, max_delay=2.0)
    killer.start()
    first = run_snakemake(tmp_path, config)
    killer.stop.set()
    killer.join(timeout=5)
    assert killer.killed, "no stage was killed; the test did not exercise an interruption"
    assert first.returncode != 0
    # Every feature file under a final name is complete and readable.
    for path in (tmp_path / "results/features").rglob("*.h5"):
        with h5py.File(path, "r") as fh:
            assert fh["features"].shape[0] == fh.attrs["count"], path
    second = run_snakemake(tmp_path, config, "--rerun-incomplete")
    assert second.returncode == 0, second.stderr[-3000:]
    assert output_files(tmp_path) == uninterrupted
