"""FD-loss post-training of a generator through its one-step sampling path.

A run writes ``checkpoint.pt`` every ``checkpoint_every`` steps and on SIGTERM
or SIGUSR1 (then it exits with ``PREEMPTED_EXIT_CODE``). Started again with the
same settings, it resumes from that checkpoint with the same random streams,
so a resumed run ends with the same weights and metrics as an uninterrupted
one on the same machine.
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

from fdpipe.ema import ModelEMA
from fdpipe.frechet import StatisticsError
from fdpipe.loss import FDLoss
from fdpipe.spaces import FeatureSpace
from fdpipe.stats import GaussianStats
from fdpipe.store import atomic_path

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: the job stopped early on purpose and can resume.
PREEMPTED_EXIT_CODE = 75


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


class OneStepSampler:
    """Source of generated images: random noise and labels through the trained sampling path."""

    def __init__(self, generator: torch.nn.Module, cfg: FinetuneConfig, device: torch.device):
        self.generator = generator
        self.cfg = cfg
        self.device = device
        self.rng = torch.Generator(device="cpu").manual_seed(cfg.seed)

    def __call__(self, batch_size: int) -> torch.Tensor:
        shape = (batch_size, *self.generator.image_shape)
        noise = torch.randn(shape, generator=self.rng).to(self.device)
        classes = max(1, int(self.generator.num_classes))
        labels = torch.randint(0, classes, (batch_size,), generator=self.rng).to(self.device)
        images = self.generator.sample(noise, labels, self.cfg.sample_steps,
                                       guidance_scale=self.cfg.guidance_scale)
        return unit_range(images)


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


class FinetuneState:
    """Everything a run needs to continue: models, optimiser, statistics, RNG, metrics."""

    def __init__(self, generator, fd_loss, optimizer, ema, sampler, cfg, source):
        self.generator = generator
        self.fd_loss = fd_loss
        self.optimizer = optimizer
        self.ema = ema
        self.sampler = sampler
        self.cfg = cfg
        self.source = source
        self.step = 0
        self.metrics: list[dict[str, Any]] = []

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
            "fingerprint": self.cfg.fingerprint(),
            "rng": {"sampler": self.sampler.rng.get_state(),
                    "torch": torch.random.get_rng_state()},
            "metrics": self.metrics,
        }

    def load(self, checkpoint: dict[str, Any]) -> None:
        self.generator.load_state_dict(checkpoint["state_dict"])
        self.ema.load_state_dict(checkpoint["weight_ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.fd_loss.load_state_dict(checkpoint["fd_statistics"])
        self.sampler.rng.set_state(checkpoint["rng"]["sampler"])
        torch.random.set_rng_state(checkpoint["rng"]["torch"])
        self.step = int(checkpoint["step"])
        self.metrics = list(checkpoint["metrics"])

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            torch.save(self.to_dict(), tmp)


def _load_resume_point(path: Path, cfg: FinetuneConfig) -> dict[str, Any] | None:
    if not path.exists():
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint.get("fingerprint") != cfg.fingerprint():
        log.warning("ignoring %s: it was written with other settings (fingerprint %s, now %s)",
                    path, checkpoint.get("fingerprint"), cfg.fingerprint())
        return None
    return checkpoint


@torch.no_grad()
def _fill_statistics(fd_loss: FDLoss, sampler: OneStepSampler, spaces, cfg: FinetuneConfig):
    chunks: dict[str, list[torch.Tensor]] = {s: [] for s in cfg.spaces}
    for start in range(0, cfg.fill_samples, cfg.batch_size):
        images = sampler(min(cfg.batch_size, cfg.fill_samples - start))
        features = space_features(spaces, images, cfg.spaces)
        bad = nonfinite_spaces(features)
        if bad:
            raise FloatingPointError(
                f"space(s) {bad} returned NaN or Inf features for generated images "
                f"{start}..{start + images.shape[0] - 1} while filling the statistics"
            )
        for name, feats in features.items():
            chunks[name].append(feats)
    fd_loss.fill({s: torch.cat(v) for s, v in chunks.items()})
    log.info("filled the %s statistics with features of %d generated images",
             cfg.method, cfg.fill_samples)


def _train_step(state: FinetuneState, spaces) -> tuple[dict[str, Any] | None, str | None]:
    """Run one optimiser step; return (metrics, None) or (None, reason it was skipped)."""
    cfg = state.cfg
    images = state.sampler(cfg.batch_size)
    features = space_features(spaces, images, cfg.spaces)
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


def finetune(generator: torch.nn.Module, spaces: dict[str, FeatureSpace],
             references: dict[str, GaussianStats], cfg: FinetuneConfig, out_dir: str | Path,
             generator_source: dict[str, Any], device: torch.device | str = "cpu") -> dict:
    """Post-train ``generator`` with FD-loss; write metrics.jsonl and generator.pt.

    Resumes from ``out_dir/checkpoint.pt`` when it was written with the same
    settings. Raises Preempted after checkpointing on SIGTERM/SIGUSR1, and
    TrainingDiverged after ``max_consecutive_skips`` skipped steps in a row.
    """
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    torch.manual_seed(cfg.seed)
    generator = generator.to(device).train()
    for space in spaces.values():
        space.to(device)
    fd_loss = FDLoss({s: references[s] for s in cfg.spaces}, method=cfg.method, beta=cfg.beta,
                     queue_size=cfg.queue_size, weights=cfg.weights).to(device)
    sampler = OneStepSampler(generator, cfg, device)
    optimizer = torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
    ema = ModelEMA(generator, cfg.weight_ema)
    state = FinetuneState(generator, fd_loss, optimizer, ema, sampler, cfg, generator_source)

    resume = _load_resume_point(checkpoint_path, cfg)
    last_checkpoint_step = 0
    if resume is not None:
        state.load(resume)
        last_checkpoint_step = state.step
        log.info("resumed from %s at step %d of %d", checkpoint_path, state.step, cfg.steps)
    else:
        _fill_statistics(fd_loss, sampler, spaces, cfg)

    skips = 0
    with SignalFlag() as flag, tqdm(total=cfg.steps, initial=state.step, desc="fd-loss",
                                    mininterval=5, disable=None) as progress:
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
            if flag.received is not None:
                state.save(checkpoint_path)
                raise Preempted(f"received signal {flag.received} at step {step}; "
                                f"checkpoint written to {checkpoint_path}, rerun to resume")

    _write_metrics(out_dir / "metrics.jsonl", state.metrics)
    state.save(out_dir / "generator.pt")
    if checkpoint_path.exists():
        checkpoint_path.unlink()
    return state.metrics[-1] if state.metrics else {}
