"""Built-in class-conditional flow-matching generator (a residual MLP).

Flow matching with the linear path x_t = (1 - t) z + t x, z ~ N(0, I). The
network predicts the clean image x_hat(x_t, t, y); the velocity of the path is
then v = (x_hat - x_t) / (1 - t). ``sample`` integrates dx/dt = v from t = 0 to
1 with N Euler steps, and the last step lands exactly on x_hat. One step
returns x_hat(z, 0, y), close to the (blurry) class mean; FD-loss post-training
turns that path into a good one-step generator.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlowConfig:
    channels: int = 1
    resolution: int = 32
    num_classes: int = 10
    hidden: int = 512
    blocks: int = 3
    time_dim: int = 64
    label_dropout: float = 0.1


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = (1000.0 * t)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.modulation = nn.Linear(hidden, 2 * hidden)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(cond).chunk(2, dim=1)
        x = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(torch.nn.functional.silu(self.fc1(x)))


class FlowMLP(nn.Module):
    """Clean-image predictor x_hat(x_t, t, y) with an Euler sampler."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        self.image_shape = (config.channels, config.resolution, config.resolution)
        self.num_classes = config.num_classes
        pixels = config.channels * config.resolution**2
        self.input = nn.Linear(pixels, config.hidden)
        self.time = nn.Sequential(nn.Linear(config.time_dim, config.hidden), nn.SiLU(),
                                  nn.Linear(config.hidden, config.hidden))
        # The extra label index is the "no label" token for classifier-free guidance.
        self.label = nn.Embedding(config.num_classes + 1, config.hidden)
        self.blocks = nn.ModuleList(ResidualBlock(config.hidden) for _ in range(config.blocks))
        self.out_norm = nn.LayerNorm(config.hidden)
        self.output = nn.Linear(config.hidden, pixels)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict the clean image from x_t."""
        cond = torch.nn.functional.silu(
            self.time(timestep_embedding(t, self.config.time_dim)) + self.label(labels))
        h = self.input(x.flatten(1))
        for block in self.blocks:
            h = block(h, cond)
        return self.output(self.out_norm(h)).view_as(x)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        remaining = (1.0 - t).clamp_min(1e-3).view(-1, *([1] * (x.dim() - 1)))
        return (self.denoise(x, t, labels) - x) / remaining

    def guided_velocity(self, x, t, labels, guidance_scale: float) -> torch.Tensor:
        if guidance_scale == 1.0:
            return self.velocity(x, t, labels)
        null = torch.full_like(labels, self.num_classes)
        v = self.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def sample(self, noise: torch.Tensor, labels: torch.Tensor, steps: int,
               guidance_scale: float = 1.0) -> torch.Tensor:
        """Integrate from noise to images with ``steps`` Euler steps; return [-1, 1]."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        x = noise
        dt = 1.0 / steps
        for i in range(steps):
            t = torch.full((x.shape[0],), i * dt, device=x.device, dtype=x.dtype)
            x = x + dt * self.guided_velocity(x, t, labels, guidance_scale)
        return x.clamp(-1.0, 1.0)

    def loss(self, images: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean squared error of the clean-image prediction, images in [-1, 1]."""
        b = images.shape[0]
        noise = torch.randn(images.shape, generator=generator, device=images.device)
        t = torch.rand(b, generator=generator, device=images.device)
        drop = torch.rand(b, generator=generator, device=images.device) < self.config.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        tt = t.view(b, 1, 1, 1)
        x_t = (1 - tt) * noise + tt * images
        return ((self.denoise(x_t, t, labels) - images) ** 2).mean()


def save_flow(path: str | Path, model: FlowMLP, extra: dict[str, Any] | None = None) -> None:
    from fdpipe.store import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"config": asdict(model.config), "state_dict": model.state_dict(),
                    **(extra or {})}, tmp)


def build_flow(checkpoint: str | None = None, **options: Any) -> FlowMLP:
    """Factory for the built-in generator: load ``checkpoint`` or build from options."""
    if checkpoint is None:
        return FlowMLP(FlowConfig(**options))
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"generator checkpoint {path} not found; train the base model "
                                f"first (`fdpipe pretrain`) or fix generator.checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "config" not in state or "state_dict" not in state:
        raise ValueError(f"{path}: not a built-in flow checkpoint (needs 'config' and "
                         f"'state_dict')")
    model = FlowMLP(FlowConfig(**state["config"]))
    weights = state.get("ema_state_dict") or state["state_dict"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the flow model config "
                         f"{state['config']}: {err}") from err
    return model
