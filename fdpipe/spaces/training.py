"""Training of the demo spaces on the train split (classifier, MAE, SimCLR)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fdpipe.data.images import to_unit_float
from fdpipe.spaces.demo import TRAINED_FAMILIES, make_network

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderTrainConfig:
    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.5
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderTrainConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """SimCLR-style views: random resized crop, flip and brightness/contrast jitter."""
    b = x.shape[0]
    scale = torch.empty(b).uniform_(0.6, 1.0, generator=generator)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (1 - scale)[:, None]
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    views = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    contrast = torch.empty(b, 1, 1, 1).uniform_(0.6, 1.4, generator=generator)
    brightness = torch.empty(b, 1, 1, 1).uniform_(-0.2, 0.2, generator=generator)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    return ((views - mean) * contrast + mean + brightness).clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy over 2B views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, targets)


def _batch_loss(family: str, net, x, y, cfg: EncoderTrainConfig, gen) -> torch.Tensor:
    if family == "classifier":
        return F.cross_entropy(net.logits(x), y)
    if family == "mae":
        return net.loss(x, generator=gen)
    z1 = net.projection(net.encoder(augment(x, gen)))
    z2 = net.projection(net.encoder(augment(x, gen)))
    return nt_xent(z1, z2, cfg.temperature)


@torch.no_grad()
def evaluate_encoder(family: str, net, images: np.ndarray, labels: np.ndarray,
                     cfg: EncoderTrainConfig) -> dict[str, float]:
    """Test-split metric: accuracy for the classifier, mean loss otherwise."""
    net.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    correct, total, loss_sum = 0, 0, 0.0
    for start in range(0, images.shape[0], 512):
        x = to_unit_float(images[start : start + 512])
        y = torch.from_numpy(labels[start : start + 512])
        if family == "classifier":
            correct += int((net.logits(x).argmax(1) == y).sum())
        else:
            loss_sum += float(_batch_loss(family, net, x, y, cfg, gen)) * x.shape[0]
        total += x.shape[0]
    net.train()
    if family == "classifier":
        return {"test_accuracy": correct / total}
    return {"test_loss": loss_sum / total}


def train_encoder(family: str, options: dict[str, Any], images: np.ndarray, labels: np.ndarray,
                  test_images: np.ndarray, test_labels: np.ndarray,
                  cfg: EncoderTrainConfig) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train one demo network; return it and its test-split metrics."""
    if family not in TRAINED_FAMILIES:
        raise ValueError(f"family '{family}' is not trained; trained ones: {TRAINED_FAMILIES}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = make_network(family, options)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = images.shape[0]
    steps_per_epoch = max(1, n // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    net.train()
    progress = tqdm(total=total_steps, desc=f"train {family}", mininterval=5, disable=None)
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).numpy()
        running = 0.0
        for i in range(steps_per_epoch):
            index = np.sort(order[i * cfg.batch_size : (i + 1) * cfg.batch_size])
            x = to_unit_float(images[index])
            y = torch.from_numpy(labels[index])
            loss = _batch_loss(family, net, x, y, cfg, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
            progress.update(1)
        log.info("%s epoch %d/%d: mean training loss %.4f", family, epoch + 1, cfg.epochs,
                 running / steps_per_epoch)
    progress.close()
    metrics = evaluate_encoder(family, net, test_images, test_labels, cfg)
    log.info("%s test metrics: %s", family, metrics)
    return net.eval(), metrics
