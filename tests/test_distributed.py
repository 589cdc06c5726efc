"""Multi-process FD-loss training: two gloo ranks on CPU against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from fdpipe.distributed import DistContext, context_from_env
from fdpipe.ema import ModelEMA
from fdpipe.generators.flow import FlowConfig, FlowMLP, save_flow
from fdpipe.loss import FDLoss
from fdpipe.spaces import SpaceSpec, build_space
from fdpipe.stats import GaussianStats
from fdpipe.train import (
    FinetuneConfig,
    FinetuneState,
    OneStepSampler,
    _sampling_path,
    _train_step,
    unit_range,
)

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
BATCH = 32
FLOW = {"resolution": 8, "hidden": 32, "blocks": 1}


class FixedSampler(OneStepSampler):
    """Sampler whose noise and labels are given, so a rank's share is known exactly."""

    def __init__(self, generator, cfg, path, noise, labels):
        super().__init__(generator, cfg, torch.device("cpu"), path=path)
        self.noise, self.labels = noise, labels

    def __call__(self, batch_size: int) -> torch.Tensor:
        assert batch_size == self.noise.shape[0], (batch_size, self.noise.shape)
        return unit_range(self.path(self.noise, self.labels))


def _one_step(dist: DistContext) -> dict:
    """Run one FD-loss step on this rank's share of a fixed batch; return what to compare."""
    space = build_space(SpaceSpec("pixels", "pixels", {"size": 4}))
    data = torch.Generator().manual_seed(1)
    real = torch.rand(400, 1, 8, 8, generator=data) * 0.3 + 0.4
    with torch.no_grad():
        ref = GaussianStats.from_features(space(real).double().numpy(), space="pixels")
    torch.manual_seed(2)
    generator = FlowMLP(FlowConfig(**FLOW))
    torch.nn.init.normal_(generator.output.weight, std=0.05)
    cfg = FinetuneConfig(spaces=("pixels",), batch_size=BATCH, fill_samples=64, beta=0.9,
                         lr=1e-3, grad_clip=1e9)
    fd_loss = FDLoss({"pixels": ref}, method="ema", beta=cfg.beta)
    fill = torch.rand(64, 1, 8, 8, generator=data)
    with torch.no_grad():
        fd_loss.fill({"pixels": space(fill)})

    noise = torch.randn(BATCH, 1, 8, 8, generator=data)
    labels = torch.randint(0, 10, (BATCH,), generator=data)
    share = BATCH // dist.world_size
    part = slice(dist.rank * share, (dist.rank + 1) * share)
    path = _sampling_path(generator, cfg, torch.device("cpu"), dist)
    sampler = FixedSampler(generator, cfg, path, noise[part], labels[part])
    optimizer = torch.optim.Adam(generator.parameters(), lr=cfg.lr)
    state = FinetuneState(generator, fd_loss, optimizer, ModelEMA(generator, 0.9), sampler, cfg,
                          {}, dist)
    metrics, reason = _train_step(state, {"pixels": space})
    assert reason is None, reason
    return {
        "loss": metrics["loss"],
        "grads": {n: p.grad.detach().clone() for n, p in generator.named_parameters()},
        "weights": {n: p.detach().clone() for n, p in generator.named_parameters()},
        "ema_mu": fd_loss.estimators["pixels"].mu.clone(),
    }


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                  world_size=WORLD)
    try:
        result = _one_step(DistContext(rank=rank, world_size=WORLD, local_rank=rank))
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def two_rank_step(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_main, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return ranks, _one_step(DistContext())


def test_ddp_loss_matches_single_process(two_rank_step):
    ranks, single = two_rank_step
    for rank in ranks:
        assert abs(rank["loss"] - single["loss"]) <= 1e-6 * abs(single["loss"])


def test_ddp_gradient_matches_single_process(two_rank_step):
    ranks, single = two_rank_step
    assert set(ranks[0]["grads"]) == set(single["grads"])
    for name, grad in single["grads"].items():
        assert float(grad.norm()) > 0, f"{name} got no gradient"
        assert _relative(ranks[0]["grads"][name], grad) <= 1e-6, name
        # DistributedDataParallel leaves the same averaged gradient on every rank.
        assert torch.equal(ranks[1]["grads"][name], ranks[0]["grads"][name]), name


def test_ddp_step_updates_weights_and_statistics(two_rank_step):
    ranks, single = two_rank_step
    for name, weights in single["weights"].items():
        assert _relative(ranks[0]["weights"][name], weights) <= 1e-6, name
    # The EMA statistics are updated with the whole batch, not the rank's share.
    assert _relative(ranks[0]["ema_mu"], single["ema_mu"]) <= 1e-9
    assert torch.equal(ranks[1]["ema_mu"], ranks[0]["ema_mu"])


def test_context_from_env_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = context_from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (3, 4, 1)
    assert ctx.enabled and not ctx.is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="inconsistent"):
        context_from_env()


def test_single_process_context_is_identity():
    ctx = DistContext()
    x = torch.randn(3, 2, requires_grad=True)
    assert ctx.gather(x) is x
    assert ctx.gather_objects("a") == ["a"]
    assert ctx.any_rank(True, torch.device("cpu")) is True
    assert not ctx.enabled
    assert ctx.is_main


def test_batch_not_divisible_by_ranks_raises(tmp_path):
    from fdpipe.train import finetune

    space = build_space(SpaceSpec("pixels", "pixels", {"size": 4}))
    ref = GaussianStats.from_features(np.random.default_rng(0).random((100, 16)), space="pixels")
    cfg = FinetuneConfig(spaces=("pixels",), batch_size=33, fill_samples=64)
    with pytest.raises(ValueError, match="batch_size = 33 is not a multiple of the 2"):
        finetune(FlowMLP(FlowConfig(**FLOW)), {"pixels": space}, {"pixels": ref}, cfg, tmp_path,
                 {}, dist=DistContext(rank=0, world_size=2))


@pytest.mark.slow
def test_torchrun_finetune_writes_once(tmp_path):
    """``torchrun -m fdpipe finetune`` with two CPU ranks trains and writes one set of files."""
    space = build_space(SpaceSpec("pixels", "pixels", {"size": 4}))
    real = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        GaussianStats.from_features(space(real).double().numpy(),
                                    space="pixels").save(tmp_path / "pixels.npz")
    torch.manual_seed(0)
    base = FlowMLP(FlowConfig(**FLOW))
    # A zero output layer makes every image the same and the covariance zero.
    torch.nn.init.normal_(base.output.weight, std=0.05)
    save_flow(tmp_path / "base.pt", base, {})

    spec = {"run": {"spaces": ["pixels"], "steps": 3, "batch_size": 16, "fill_samples": 32,
                    "log_every": 1, "checkpoint_every": 2},
            "spaces": {"pixels": {"family": "pixels", "options": {"size": 4}}},
            "generator": {"factory": "fdpipe.generators.flow:build_flow", "checkpoint": None,
                          "options": {}}}
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fdpipe", "finetune", "--spec", json.dumps(spec),
         "--generator-checkpoint", str(tmp_path / "base.pt"), "--spaces", "pixels",
         "--stats", str(tmp_path / "pixels.npz"), "--device", "cpu", "--threads", "1",
         "--out-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-3000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    checkpoint = torch.load(out / "generator.pt", weights_only=False)
    assert checkpoint["world_size"] == 2
    assert len(checkpoint["rng"]["ranks"]) == 2
    assert not (out / "checkpoint.pt").exists()
    assert "rank 1 of 2 joined the gloo process group" in result.stderr
