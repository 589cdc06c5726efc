import json

import numpy as np
import pytest
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
    torch.nn.init.normal_(model.output.weight, std=0.05)
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
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
        base_model = FlowMLP(FlowConfig(resolution=8, hidden=64, blocks=1))
        base_model.load_state_dict(untrained)
        base = space(unit_range(base_model.sample(noise, labels, 1))).double().numpy()
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


class TriggerSpace(torch.nn.Module):
    """Wraps a space; from call ``at`` on, sends a signal or returns NaN features."""

    def __init__(self, space, at: int, action: str):
        super().__init__()
        self.space = space
        self.spec = space.spec
        self.dim = space.dim
        self.calls = 0
        self.at = at
        self.action = action

    def forward(self, images):
        self.calls += 1
        out = self.space(images)
        if self.calls >= self.at:
            if self.action == "sigterm" and self.calls == self.at:
                import os
                import signal

                os.kill(os.getpid(), signal.SIGTERM)
            if self.action == "nan":
                out = out * float("nan")
        return out


def tiny_run(tmp_path, space, steps=12, **overrides):
    torch.manual_seed(0)
    real = torch.rand(500, 1, 8, 8) * 0.2 + 0.5
    ref = reference_for(build_space(SpaceSpec("pixels", "pixels", {"size": 4})), real)
    model = FlowMLP(FlowConfig(resolution=8, hidden=32, blocks=1))
    torch.nn.init.normal_(model.output.weight, std=0.05)
    source = {"factory": "fdpipe.generators.flow:build_flow", "checkpoint": None,
              "options": {"resolution": 8, "hidden": 32, "blocks": 1}}
    cfg = FinetuneConfig(**{"spaces": ("pixels",), "steps": steps, "batch_size": 32,
                            "lr": 1e-3, "beta": 0.9, "fill_samples": 64, "log_every": 1,
                            "checkpoint_every": 4, **overrides})
    return finetune(model, {"pixels": space}, {"pixels": ref}, cfg, tmp_path, source)


def test_preempted_run_resumes_identically(tmp_path):
    from fdpipe.train import Preempted

    pixels = build_space(SpaceSpec("pixels", "pixels", {"size": 4}))
    tiny_run(tmp_path / "straight", pixels)
    # Fill uses 2 calls; the signal arrives during step 7.
    with pytest.raises(Preempted, match="rerun to resume"):
        tiny_run(tmp_path / "cut", TriggerSpace(pixels, at=2 + 7, action="sigterm"))
    saved = torch.load(tmp_path / "cut/checkpoint.pt", weights_only=False)
    assert saved["step"] == 7
    assert not (tmp_path / "cut/generator.pt").exists()
    tiny_run(tmp_path / "cut", pixels)
    a = torch.load(tmp_path / "straight/generator.pt", weights_only=False)
    b = torch.load(tmp_path / "cut/generator.pt", weights_only=False)
    for key in a["ema_state_dict"]:
        assert torch.equal(a["ema_state_dict"][key], b["ema_state_dict"][key]), key
    assert (tmp_path / "straight/metrics.jsonl").read_text() == \
        (tmp_path / "cut/metrics.jsonl").read_text()
    assert not (tmp_path / "cut/checkpoint.pt").exists()


def test_changed_settings_do_not_resume(tmp_path):
    from fdpipe.train import Preempted

    pixels = build_space(SpaceSpec("pixels", "pixels", {"size": 4}))
    with pytest.raises(Preempted):
        tiny_run(tmp_path, TriggerSpace(pixels, at=2 + 5, action="sigterm"))
    last = tiny_run(tmp_path, pixels, lr=5e-4)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12
    assert last["step"] == 12


def test_nan_features_stop_and_keep_checkpoint(tmp_path, caplog):
    from fdpipe.train import TrainingDiverged

    pixels = build_space(SpaceSpec("pixels", "pixels", {"size": 4}))
    # Steps 1-9 are fine (checkpoint at steps 4 and 8); every later call is NaN.
    with pytest.raises(TrainingDiverged) as err:
        tiny_run(tmp_path, TriggerSpace(pixels, at=2 + 10, action="nan"),
                 max_consecutive_skips=3)
    message = str(err.value)
    assert "stopped at step 10" in message
    assert "3 consecutive skipped steps" in message
    assert "'pixels'" in message
    assert "(step 8)" in message
    assert "step 10 skipped" in caplog.text
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 8
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    assert not (tmp_path / "generator.pt").exists()
