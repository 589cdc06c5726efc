"""Exponential moving average of model weights."""

from __future__ import annotations

import copy

import torch


class ModelEMA:
    """EMA copy of a model, with decay min(decay, (1 + step) / (10 + step)) so
    that short runs are not dominated by the initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"weight EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.step = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.step += 1
        decay = min(self.decay, (1 + self.step) / (10 + self.step))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "step": self.step, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
