import json

import numpy as np
import torch

from fdpipe.generators.flow import FlowConfig, FlowMLP
from fdpipe.spaces import SpaceSpec, build_space
from fdpipe.stats import GaussianStats
from fdpipe.train import FinetuneConfig, finetune, unit_range


def reference_for(space, images: torch.Tensor) -> GaussianStats:
    with torch.no_grad():
        return GaussianStats.from_features(space(images).double().numpy(), space=space.spec.name)


def test_finetune_lowers_fd_and_writes_checkpoint(tmp_path):
    torch.manual_seed(0)
    space = build_space(SpaceSpec("pixels", "pixels", {"size": 4}))
    # Real images: bright top half, dark bottom half, with noise.
    real = torch.rand(2000, 1, 8, 8) * 0.2
    real[:, :, :4] += 0.7
    ref = reference_for(space, real)
    model = FlowMLP(FlowConfig(resolution=8, hidden=64, blocks=1))
    source = {"factory": "fdpipe.generators.flow:build_flow", "checkpoint": None,
              "options": {"resolution": 8, "hidden": 64, "blocks": 1}}
    cfg = FinetuneConfig(spaces=("pixels",), steps=80, batch_size=64, lr=3e-3, beta=0.9,
                         fill_samples=256, weight_ema=0.9, log_every=20)
    finetune(model, {"pixels": space}, {"pixels": ref}, cfg, tmp_path, source)

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1
    assert lines[-1]["step"] == 80
    assert lines[-1]["fd"]["pixels"] < 0.5 * lines[0]["fd"]["pixels"]

    checkpoint = torch.load(tmp_path / "generator.pt", weights_only=False)
    for key in ("state_dict", "ema_state_dict", "optimizer", "fd_statistics", "step", "config"):
        assert key in checkpoint
    assert checkpoint["step"] == 80
    assert "estimators.pixels.mu" in checkpoint["fd_statistics"]

    # The fine-tuned one-step generator is closer to the reference than before.
    tuned = FlowMLP(FlowConfig(resolution=8, hidden=64, blocks=1))
    tuned.load_state_dict(checkpoint["ema_state_dict"])
    noise, labels = torch.randn(1000, 1, 8, 8), torch.arange(1000) % 10
    with torch.no_grad():
        feats = space(unit_range(tuned.sample(noise, labels, 1))).double().numpy()
        base = space(unit_range(FlowMLP(FlowConfig(resolution=8, hidden=64, blocks=1))
                                .sample(noise, labels, 1))).double().numpy()
    tuned_fd = ref.frechet_distance_to(feats.mean(0), np.cov(feats, rowvar=False))
    base_fd = ref.frechet_distance_to(base.mean(0), np.cov(base, rowvar=False))
    assert tuned_fd < 0.5 * base_fd


def test_finetune_external_plugin(tmp_path):
    from fdpipe.generators import load_generator

    space = build_space(SpaceSpec("pixels", "pixels", {"size": 4}))
    ref = reference_for(space, torch.rand(500, 1, 8, 8))
    model = load_generator("tests.plugin_generator:build", None, {"resolution": 8})
    source = {"factory": "tests.plugin_generator:build", "checkpoint": None,
              "options": {"resolution": 8}}
    cfg = FinetuneConfig(spaces=("pixels",), steps=3, batch_size=32, fill_samples=64,
                         log_every=1)
    last = finetune(model, {"pixels": space}, {"pixels": ref}, cfg, tmp_path, source)
    assert last["step"] == 3
    assert np.isfinite(last["fd"]["pixels"])
