"""The paper-scale config: schema, data_root override and the planned Snakemake DAG."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from fdpipe.config import ConfigError, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config/imagenet256.yaml"
GPU_STAGES = {"extract_real", "extract_generated", "finetune", "sample_base", "sample_run"}
PUBLISHED = {"inception": 1.68, "convnext": 56.87, "dinov2": 14.19, "mae": 0.04,
             "siglip": 0.60, "clip": 5.60}


@pytest.fixture()
def fake_imagenet(tmp_path) -> Path:
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for label, synset in enumerate(("n01440764", "n01443537")):
            folder = root / split / synset
            folder.mkdir(parents=True)
            Image.new("RGB", (40, 30), (label * 100, 20, 30)).save(folder / "img0.JPEG")
    return root


def raw_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_config_has_six_paper_spaces():
    config = load_config(CONFIG)
    families = {name: space["family"] for name, space in config["spaces"].items()}
    assert families == {"inception": "inception", "convnext": "timm", "dinov2": "timm",
                        "mae": "timm", "siglip": "timm", "clip": "timm"}
    models = {space["options"]["model"] for space in config["spaces"].values()
              if space["family"] == "timm"}
    assert models == {"convnextv2_base.fcmae_ft_in22k_in1k", "vit_large_patch14_dinov2.lvd142m",
                      "vit_large_patch16_224.mae", "vit_large_patch14_clip_224.openai",
                      "vit_so400m_patch16_siglip_256.v2_webli"}
    assert config["evaluation"]["fdrk_spaces"] == list(PUBLISHED)
    assert config["evaluation"]["published_normalisers"] == PUBLISHED
    assert config["evaluation"]["normalisers"] == "computed"
    assert config["evaluation"]["num_samples"] == 50000
    assert config["generator"]["checkpoint"]


def test_data_root_overrides_data_root_key(tmp_path):
    config = validate_config({**raw_config(), "data_root": str(tmp_path)})
    assert config["data"]["root"] == str(tmp_path)


def test_unknown_top_level_key_rejected():
    with pytest.raises(ConfigError) as err:
        validate_config({**raw_config(), "data_rot": "/x"})
    assert "did you mean 'data_root'" in str(err.value)


def test_published_needs_every_space():
    config = raw_config()
    config["evaluation"]["normalisers"] = "published"
    del config["evaluation"]["published_normalisers"]["mae"]
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert "mae" in str(err.value)


def test_imagefolder_needs_external_generator():
    config = raw_config()
    config["generator"]["checkpoint"] = None
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert "generator.checkpoint" in str(err.value)


def test_unknown_dataset_lists_allowed():
    config = raw_config()
    config["data"]["dataset"] = "imagenet"
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert "'imagefolder'" in str(err.value)


def planned_rules(output: str) -> list[tuple[str, str]]:
    """(rule, resources line) of every job in a dry run's output."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        match = re.match(r"(?:local)?rule (\w+):", block.strip())
        if match:
            resources = re.search(r"resources: (.*)", block)
            jobs.append((match.group(1), resources.group(1) if resources else ""))
    return jobs


def test_dry_run_plans_paper_dag(tmp_path, fake_imagenet):
    workdir = tmp_path / "work"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "checkpoints/imagenet256-generator.pt").write_bytes(b"stand-in")
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
               str(workdir), "-n", "-p", "--configfile", str(CONFIG), "--config",
               f"data_root={fake_imagenet}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = planned_rules(result.stdout)
    counts: dict[str, int] = {}
    for rule, _ in jobs:
        counts[rule] = counts.get(rule, 0) + 1
    assert counts == {"prepare_data": 2, "extract_real": 12, "stats": 6, "valfd": 1,
                      "finetune": 3, "sample_base": 1, "sample_run": 3,
                      "extract_generated": 24, "evaluate": 24, "aggregate": 1, "all": 1}
    for rule, resources in jobs:
        if rule in GPU_STAGES:
            assert "gpu=1" in resources, rule
        else:
            assert "gpu=1" not in resources, rule
    assert f"--root {fake_imagenet}" in result.stdout
    assert "results/data/train.manifest.json" in result.stdout


def test_published_normalisers_reach_valfd(tmp_path, fake_imagenet):
    config = raw_config()
    config["evaluation"]["normalisers"] = "published"
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "work"
    workdir.mkdir()
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
               str(workdir), "results/stats/valfd.json", "-n", "-p", "--configfile", str(path),
               "--config", f"data_root={fake_imagenet}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    valfd_command = [line for line in result.stdout.splitlines() if " valfd " in line]
    assert valfd_command, result.stdout
    assert '"inception": 1.68' in valfd_command[0]
    assert '"mae": 0.04' in valfd_command[0]
