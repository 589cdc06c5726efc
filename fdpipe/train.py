"""FD-loss post-training of a generator through its one-step sampling path."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fdpipe.ema import ModelEMA
from fdpipe.loss import FDLoss
from fdpipe.spaces import FeatureSpace
from fdpipe.stats import GaussianStats
from fdpipe.store import atomic_path

log = logging.getLogger(__name__)


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
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["spaces"] = tuple(known["spaces"])
        if "adam_betas" in known:
            known["adam_betas"] = tuple(known["adam_betas"])
        return cls(**known)


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map generator output in [-1, 1] to [0, 1], the input range of every space."""
    return (images + 1.0) * 0.5


class OneStepSampler:
    """Draws noise and labels and runs the generator's few-step path."""

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
                   names: tuple[str, ...], step: int) -> dict[str, torch.Tensor]:
    features = {}
    for name in names:
        out = spaces[name](images)
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"space '{name}' returned NaN or Inf features at step {step}")
        features[name] = out
    return features


def finetune(generator: torch.nn.Module, spaces: dict[str, FeatureSpace],
             references: dict[str, GaussianStats], cfg: FinetuneConfig, out_dir: str | Path,
             generator_source: dict[str, Any], device: torch.device | str = "cpu") -> dict:
    """Post-train ``generator`` with FD-loss; write metrics.jsonl and generator.pt."""
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    generator = generator.to(device).train()
    for space in spaces.values():
        space.to(device)
    fd_loss = FDLoss({s: references[s] for s in cfg.spaces}, method=cfg.method, beta=cfg.beta,
                     queue_size=cfg.queue_size, weights=cfg.weights).to(device)
    sampler = OneStepSampler(generator, cfg, device)

    with torch.no_grad():
        chunks: dict[str, list[torch.Tensor]] = {s: [] for s in cfg.spaces}
        for start in range(0, cfg.fill_samples, cfg.batch_size):
            images = sampler(min(cfg.batch_size, cfg.fill_samples - start))
            for name, feats in space_features(spaces, images, cfg.spaces, 0).items():
                chunks[name].append(feats)
        fd_loss.fill({s: torch.cat(v) for s, v in chunks.items()})
    log.info("filled the %s statistics with features of %d generated images",
             cfg.method, cfg.fill_samples)

    optimizer = torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
    ema = ModelEMA(generator, cfg.weight_ema)
    metrics_path = out_dir / "metrics.jsonl"
    tmp_metrics = out_dir / ".metrics.jsonl.tmp"
    last: dict[str, Any] = {}
    with open(tmp_metrics, "w") as metrics_file:
        for step in tqdm(range(1, cfg.steps + 1), desc="fd-loss", mininterval=5, disable=None):
            images = sampler(cfg.batch_size)
            features = space_features(spaces, images, cfg.spaces, step)
            loss, fds = fd_loss(features)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(generator.parameters(), cfg.grad_clip)
            optimizer.step()
            fd_loss.update({k: v.detach() for k, v in features.items()})
            ema.update(generator)
            if step % cfg.log_every == 0 or step in (1, cfg.steps):
                last = {"step": step, "loss": float(loss.detach()), "grad_norm": float(grad_norm),
                        "fd": fds}
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                log.info("step %d: %s", step,
                         ", ".join(f"FD[{k}] = {v:.4g}" for k, v in fds.items()))
    checkpoint = {
        "generator": generator_source,
        "state_dict": generator.state_dict(),
        "ema_state_dict": ema.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "weight_ema": ema.state_dict(),
        "fd_statistics": fd_loss.state_dict(),
        "step": cfg.steps,
        "config": asdict(cfg),
        "rng": {"sampler": sampler.rng.get_state(), "torch": torch.random.get_rng_state()},
    }
    with atomic_path(out_dir / "generator.pt") as tmp:
        torch.save(checkpoint, tmp)
    tmp_metrics.replace(metrics_path)
    return last
