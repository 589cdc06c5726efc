"""FD-loss post-training of a generator through its one-step sampling path.

A run writes ``checkpoint.pt`` every ``checkpoint_every`` steps and on SIGTERM
or SIGUSR1 (then it exits with ``PREEMPTED_EXIT_CODE``). Started again with the
same settings, it resumes from that checkpoint with the same random streams,
so a resumed run ends with the same weights and metrics as an uninterrupted
one on the same machine.

Under torchrun (see ``fdpipe.distributed``) each rank generates
``batch_size / world_size`` images with its own noise, FD-loss uses the
whole batch on every rank, DistributedDataParallel averages the gradients,
and only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from torch.nn.parallel import DistributedDataParallel

from fdpipe.distributed import DistContext
from fdpipe.ema import ModelEMA
from fdpipe.frechet import StatisticsError
from fdpipe.eigen import resolve_eigensolver
from fdpipe.loss import FDLoss
from fdpipe.spaces import FeatureSpace
from fdpipe.stats import GaussianStats
from fdpipe.store import atomic_path

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: the job stopped early on purpose and can resume.
PREEMPTED_EXIT_CODE = 75

# Rank r draws noise from seed + r * RANK_SEED_STRIDE, so ranks differ and
# rank 0 of a run with seed s never repeats rank 0 of a run with seed s + 1.
RANK_SEED_STRIDE = 1_000_003


class Preempted(RuntimeError):
    """Raised after a checkpoint was written because SIGTERM or SIGUSR1 arrived."""


class TrainingDiverged(RuntimeError):
    """Raised after too many consecutive steps with a non-finite loss or gradient."""


@dataclass(frozen=True)
class FinetuneConfig:
    spaces: tuple[str, ...]
    weights: dict[str, float] = field(default_factory=dict)
    steps: int = 400
    batch_size: int = 256
    lr: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    method: str = "ema"
    beta: float = 0.999
    queue_size: int = 0
    eigensolver: str = "auto"
    fill_samples: int = 2048
    weight_ema: float = 0.999
    guidance_scale: float = 1.0
    sample_steps: int = 1
    log_every: int = 10
    checkpoint_every: int = 100
    max_consecutive_skips: int = 5
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["spaces"] = tuple(known["spaces"])
        if "adam_betas" in known:
            known["adam_betas"] = tuple(known["adam_betas"])
        return cls(**known)

    def fingerprint(self) -> str:
        """Hash of the settings that change the trajectory (not logging or checkpointing)."""
        settings = asdict(self)
        for key in ("log_every", "checkpoint_every", "max_consecutive_skips"):
            settings.pop(key)
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map generator output in [-1, 1] to [0, 1], the input range of every space."""
    return (images + 1.0) * 0.5


class SamplingPath(torch.nn.Module):
    """The generator's trained sampling path as ``forward``, which DistributedDataParallel wraps."""

    def __init__(self, generator: torch.nn.Module, cfg: FinetuneConfig):
        super().__init__()
        self.generator = generator
        self.steps = cfg.sample_steps
        self.guidance_scale = cfg.guidance_scale

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.generator.sample(noise, labels, self.steps, guidance_scale=self.guidance_scale)


class OneStepSampler:
    """Source of generated images: random noise and labels through the trained sampling path.

    ``path`` defaults to ``SamplingPath(generator, cfg)``; distributed runs pass
    it wrapped in DistributedDataParallel.
    """

    def __init__(self, generator: torch.nn.Module, cfg: FinetuneConfig, device: torch.device,
                 rank: int = 0, path: torch.nn.Module | None = None):
        self.generator = generator
        self.cfg = cfg
        self.device = device
        self.path = path if path is not None else SamplingPath(generator, cfg)
        self.rng = torch.Generator(device="cpu").manual_seed(cfg.seed + rank * RANK_SEED_STRIDE)

    def __call__(self, batch_size: int) -> torch.Tensor:
        shape = (batch_size, *self.generator.image_shape)
        noise = torch.randn(shape, generator=self.rng).to(self.device)
        classes = max(1, int(self.generator.num_classes))
        labels = torch.randint(0, classes, (batch_size,), generator=self.rng).to(self.device)
        return unit_range(self.path(noise, labels))


def space_features(spaces: dict[str, FeatureSpace], images: torch.Tensor,
                   names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {name: spaces[name](images) for name in names}


def nonfinite_spaces(features: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, value in features.items() if not bool(torch.isfinite(value).all())]


class SignalFlag:
    """Records SIGTERM / SIGUSR1 so the loop can checkpoint and stop between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "SignalFlag":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:
                # signal.signal only works in the main thread; elsewhere, no preemption.
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def run_fingerprint(cfg: FinetuneConfig, world_size: int) -> str:
    """``cfg.fingerprint()``, plus the process count when above 1 (it changes the noise)."""
    base = cfg.fingerprint()
    return base if world_size == 1 else f"{base}-x{world_size}"


class FinetuneState:
    """Everything a run needs to continue: models, optimiser, statistics, RNG, metrics."""

    def __init__(self, generator, fd_loss, optimizer, ema, sampler, cfg, source,
                 dist: DistContext | None = None):
        self.generator = generator
        self.fd_loss = fd_loss
        self.optimizer = optimizer
        self.ema = ema
        self.sampler = sampler
        self.cfg = cfg
        self.source = source
        self.dist = dist or DistContext()
        self.step = 0
        self.metrics: list[dict[str, Any]] = []

    def _rng_state(self) -> dict[str, Any]:
        """This rank's random streams; with several ranks, every rank's under ``ranks``.

        A collective call when distributed: every rank must call it.
        """
        rng = {"sampler": self.sampler.rng.get_state(), "torch": torch.random.get_rng_state()}
        if not self.dist.enabled:
            return rng
        return {**rng, "ranks": self.dist.gather_objects(rng)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "generator": self.source,
            "state_dict": self.generator.state_dict(),
            "ema_state_dict": self.ema.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "weight_ema": self.ema.state_dict(),
            "fd_statistics": self.fd_loss.state_dict(),
            "step": self.step,
            "config": asdict(self.cfg),
            "fingerprint": run_fingerprint(self.cfg, self.dist.world_size),
            "world_size": self.dist.world_size,
            "rng": self._rng_state(),
            "metrics": self.metrics,
        }

    def load(self, checkpoint: dict[str, Any]) -> None:
        self.generator.load_state_dict(checkpoint["state_dict"])
        self.ema.load_state_dict(checkpoint["weight_ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.fd_loss.load_state_dict(checkpoint["fd_statistics"])
        rng = checkpoint["rng"]
        if self.dist.enabled:
            rng = rng["ranks"][self.dist.rank]
        self.sampler.rng.set_state(rng["sampler"])
        torch.random.set_rng_state(rng["torch"])
        self.step = int(checkpoint["step"])
        self.metrics = list(checkpoint["metrics"])

    def save(self, path: Path) -> None:
        """Write the state on rank 0; every rank must call it and waits until it is written."""
        payload = self.to_dict()
        if self.dist.is_main:
            with atomic_path(path) as tmp:
                torch.save(payload, tmp)
        self.dist.barrier()


def _load_resume_point(path: Path, cfg: FinetuneConfig, world_size: int) -> dict[str, Any] | None:
    if not path.exists():
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    expected = run_fingerprint(cfg, world_size)
    if checkpoint.get("fingerprint") != expected:
        log.warning("ignoring %s: it was written with other settings or another process count "
                    "(fingerprint %s, now %s)", path, checkpoint.get("fingerprint"), expected)
        return None
    return checkpoint


def _check_divisible(cfg: FinetuneConfig, world_size: int) -> None:
    for key in ("batch_size", "fill_samples"):
        value = getattr(cfg, key)
        if value % world_size:
            raise ValueError(f"finetune {key} = {value} is not a multiple of the {world_size} "
                             f"training processes; set the run's {key} to a multiple of "
                             f"{world_size} or change the GPU count (resources.finetune.gpu)")


@torch.no_grad()
def _fill_statistics(fd_loss: FDLoss, sampler: OneStepSampler, spaces, cfg: FinetuneConfig,
                     dist: DistContext):
    chunks: dict[str, list[torch.Tensor]] = {s: [] for s in cfg.spaces}
    for start in range(0, cfg.fill_samples, cfg.batch_size):
        count = min(cfg.batch_size, cfg.fill_samples - start)
        images = sampler(count // dist.world_size)
        local = space_features(spaces, images, cfg.spaces)
        features = {name: dist.gather_detached(value) for name, value in local.items()}
        bad = nonfinite_spaces(features)
        if bad:
            raise FloatingPointError(
                f"space(s) {bad} returned NaN or Inf features for generated images "
                f"{start}..{start + count - 1} while filling the statistics"
            )
        for name, feats in features.items():
            chunks[name].append(feats)
    fd_loss.fill({s: torch.cat(v) for s, v in chunks.items()})
    log.info("filled the %s statistics with features of %d generated images",
             cfg.method, cfg.fill_samples)


def _train_step(state: FinetuneState, spaces) -> tuple[dict[str, Any] | None, str | None]:
    """Run one optimiser step; return (metrics, None) or (None, reason it was skipped)."""
    cfg = state.cfg
    images = state.sampler(cfg.batch_size // state.dist.world_size)
    local = space_features(spaces, images, cfg.spaces)
    # Every rank computes the loss of the whole batch, so every decision below
    # (skip or step) is the same on all ranks.
    features = {name: state.dist.gather(value) for name, value in local.items()}
    bad = nonfinite_spaces(features)
    if bad:
        return None, f"NaN or Inf features in space(s) {bad} (batch of {cfg.batch_size} images)"
    try:
        loss, fds = state.fd_loss(features)
    except (StatisticsError, FloatingPointError) as err:
        return None, f"unusable FD statistics in space(s) {list(cfg.spaces)}: {err}"
    if not bool(torch.isfinite(loss)):
        return None, f"non-finite loss in space(s) {list(cfg.spaces)} (FD per space: {fds})"
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.generator.parameters(), cfg.grad_clip)
    if not bool(torch.isfinite(grad_norm)):
        state.optimizer.zero_grad(set_to_none=True)
        return None, f"non-finite gradient from space(s) {list(cfg.spaces)}"
    state.optimizer.step()
    state.fd_loss.update({k: v.detach() for k, v in features.items()})
    state.ema.update(state.generator)
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "fd": fds}, None


def _write_metrics(path: Path, metrics: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))


def _sampling_path(generator: torch.nn.Module, cfg: FinetuneConfig, device: torch.device,
                   dist: DistContext) -> torch.nn.Module:
    path = SamplingPath(generator, cfg)
    if not dist.enabled:
        return path
    # find_unused_parameters: an external generator may leave parameters out of
    # its one-step path; DDP would then wait forever for their gradients.
    return DistributedDataParallel(path, device_ids=[device.index] if device.type == "cuda"
                                   else None, find_unused_parameters=True)


def finetune(generator: torch.nn.Module, spaces: dict[str, FeatureSpace],
             references: dict[str, GaussianStats], cfg: FinetuneConfig, out_dir: str | Path,
             generator_source: dict[str, Any], device: torch.device | str = "cpu",
             dist: DistContext | None = None) -> dict:
    """Post-train ``generator`` with FD-loss; write metrics.jsonl and generator.pt.

    Resumes from ``out_dir/checkpoint.pt`` when it was written with the same
    settings. Raises Preempted after checkpointing on SIGTERM/SIGUSR1, and
    TrainingDiverged after ``max_consecutive_skips`` skipped steps in a row.
    With ``dist`` from ``fdpipe.distributed.setup``, every rank of the group
    calls this; ``cfg.batch_size`` and ``cfg.fill_samples`` count all ranks.
    """
    dist = dist or DistContext()
    _check_divisible(cfg, dist.world_size)
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    torch.manual_seed(cfg.seed)
    generator = generator.to(device).train()
    for space in spaces.values():
        space.to(device)
    # Fails here, before any sampling, for a CPU-only solver on a GPU.
    resolve_eigensolver(cfg.eigensolver, 1, device)
    fd_loss = FDLoss({s: references[s] for s in cfg.spaces}, method=cfg.method, beta=cfg.beta,
                     queue_size=cfg.queue_size, weights=cfg.weights,
                     eigensolver=cfg.eigensolver).to(device)
    sampler = OneStepSampler(generator, cfg, device, rank=dist.rank,
                             path=_sampling_path(generator, cfg, device, dist))
    optimizer = torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
    ema = ModelEMA(generator, cfg.weight_ema)
    state = FinetuneState(generator, fd_loss, optimizer, ema, sampler, cfg, generator_source,
                          dist)

    resume = _load_resume_point(checkpoint_path, cfg, dist.world_size)
    last_checkpoint_step = 0
    if resume is not None:
        state.load(resume)
        last_checkpoint_step = state.step
        log.info("resumed from %s at step %d of %d", checkpoint_path, state.step, cfg.steps)
    else:
        _fill_statistics(fd_loss, sampler, spaces, cfg, dist)

    skips = 0
    with SignalFlag() as flag, tqdm(total=cfg.steps, initial=state.step, desc="fd-loss",
                                    mininterval=5,
                                    disable=None if dist.is_main else True) as progress:
        while state.step < cfg.steps:
            step = state.step + 1
            result, reason = _train_step(state, spaces)
            if result is None:
                skips += 1
                log.warning("step %d skipped (%d in a row): %s", step, skips, reason)
                if skips >= cfg.max_consecutive_skips:
                    raise TrainingDiverged(
                        f"stopped at step {step} after {skips} consecutive skipped steps "
                        f"({reason}); the last good checkpoint is {checkpoint_path} "
                        f"(step {last_checkpoint_step})"
                    )
                continue
            skips = 0
            state.step = step
            progress.update(1)
            if step % cfg.log_every == 0 or step in (1, cfg.steps):
                state.metrics.append({"step": step, **result})
                log.info("step %d: %s", step,
                         ", ".join(f"FD[{k}] = {v:.4g}" for k, v in result["fd"].items()))
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                state.save(checkpoint_path)
                last_checkpoint_step = step
            # All ranks stop at the same step when any of them got the signal.
            if dist.any_rank(flag.received is not None, device):
                state.save(checkpoint_path)
                received = flag.received if flag.received is not None else "on another rank"
                raise Preempted(f"received signal {received} at step {step}; "
                                f"checkpoint written to {checkpoint_path}, rerun to resume")

    if dist.is_main:
        _write_metrics(out_dir / "metrics.jsonl", state.metrics)
    state.save(out_dir / "generator.pt")
    if dist.is_main and checkpoint_path.exists():
        checkpoint_path.unlink()
    return state.metrics[-1] if state.metrics else {}
