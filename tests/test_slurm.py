"""The smoke config through the SLURM executor on a one-node cluster.

Needs a running SLURM cluster, so it is skipped unless FDPIPE_SLURM_TEST=1.
`.ci/slurm_smoke.sh` (as root) starts one on 127.0.0.1, sets the variable,
runs this file and stops the cluster; `.ci/run` calls it when CI=true.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.test_workflow import planned_jobs

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("FDPIPE_SLURM_TEST") != "1",
    reason="needs a SLURM cluster: run .ci/slurm_smoke.sh as root (.ci/run does when CI=true)",
)


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
               "--directory", str(workdir), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir, timeout=1500)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-5000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def slurm_jobs() -> dict[str, tuple[str, str]]:
    """Return {job id: (comment, state)} of every job squeue still lists."""
    output = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%k|%T"],
                            capture_output=True, text=True, check=True).stdout
    jobs = {}
    for line in output.splitlines():
        job_id, comment, state = line.strip().split("|")
        jobs[job_id] = (comment, state)
    return jobs


def rule_of(comment: str, rules: list[str]) -> str:
    """Rule name from the plugin's job comment ``rule_<name>[_wildcards_<values>]``."""
    match = re.fullmatch(r"rule_(.+?)(_wildcards_.*)?", comment)
    assert match, f"SLURM job comment {comment!r} does not name a rule"
    assert match.group(1) in rules, f"{comment!r}: unknown rule (rules: {rules})"
    return match.group(1)


def read_table(path: Path) -> dict[str, dict[str, str]]:
    return {row["variant"]: row for row in csv.DictReader(path.open())}


@pytest.fixture()
def smoke_config(tmp_path, fake_fashion_mnist) -> Path:
    config = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    config["data"]["root"] = str(fake_fashion_mnist)
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_smoke_on_slurm_matches_local_run(tmp_path, smoke_config):
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    on_slurm.mkdir()
    local.mkdir()
    planned = planned_jobs(snakemake(on_slurm, "-n", "--configfile", str(smoke_config)).stdout)
    before = slurm_jobs()

    snakemake(on_slurm, "--workflow-profile", str(REPO / "workflow/profiles/slurm"),
              "--configfile", str(smoke_config), "--jobs", "4", "--retries", "0",
              # No accounting database here: squeue (with a long MinJobAge) reports states.
              "--slurm-no-account", "--slurm-status-command", "squeue",
              "--slurm-init-seconds-before-status-checks", "2",
              "--seconds-between-status-checks", "3")
    snakemake(local, "--cores", "2", "--configfile", str(smoke_config))

    # Every rule's job (all but the target rule) ran as its own SLURM job.
    new_jobs = {i: job for i, job in slurm_jobs().items() if i not in before}
    rules = sorted(planned, key=len, reverse=True)
    ran = Counter(rule_of(comment, rules) for comment, _ in new_jobs.values())
    expected = {rule: count for rule, count in planned.items() if rule != "all"}
    assert ran == expected
    states = Counter(state for _, state in new_jobs.values())
    assert states == {"COMPLETED": sum(expected.values())}

    slurm_table = read_table(on_slurm / "results/tables/fdrk.csv")
    local_table = read_table(local / "results/tables/fdrk.csv")
    assert set(slurm_table) == set(local_table)
    compared = 0
    for variant, row in local_table.items():
        for column, value in row.items():
            got = slurm_table[variant][column]
            try:
                expected_value = float(value)
            except ValueError:
                # Names and the table's placeholder for values that do not apply.
                assert got == value, (variant, column)
                continue
            assert abs(float(got) - expected_value) <= 0.01 * abs(expected_value), (variant,
                                                                                    column)
            compared += 1
    assert compared >= 4 * len(local_table)
