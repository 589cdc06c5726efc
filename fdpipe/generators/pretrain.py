"""Training of the built-in flow-matching base generator on real images."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fdpipe.ema import ModelEMA
from fdpipe.generators.flow import FlowConfig, FlowMLP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 200

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PretrainConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def images_to_signed(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) to float32 in [-1, 1]."""
    return torch.from_numpy(images).float().div_(127.5).sub_(1.0)


def pretrain_flow(images: np.ndarray, labels: np.ndarray, model_cfg: FlowConfig,
                  cfg: PretrainConfig) -> tuple[FlowMLP, ModelEMA, list[dict[str, float]]]:
    """Train the flow model; return it, its weight EMA and the logged losses."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = FlowMLP(model_cfg)
    ema = ModelEMA(model, cfg.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    n = images.shape[0]
    history: list[dict[str, float]] = []
    running = 0.0
    for step in tqdm(range(1, cfg.steps + 1), desc="pretrain flow", mininterval=5, disable=None):
        index = torch.randint(0, n, (cfg.batch_size,), generator=gen).numpy()
        x = images_to_signed(images[index])
        y = torch.from_numpy(labels[index])
        loss = model.loss(x, y, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        running += float(loss.detach())
        if step % cfg.log_every == 0 or step == cfg.steps:
            count = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            history.append({"step": step, "loss": running / count})
            log.info("step %d/%d: flow-matching loss %.4f", step, cfg.steps, running / count)
            running = 0.0
    return model, ema, history
