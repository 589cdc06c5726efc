"""Representation spaces: frozen, differentiable maps from images to features.

A space takes float images in [0, 1] of shape (B, C, H, W) with C = 1 or 3 and
returns features (B, d). Families register a builder by name; a config entry
names the family and its options.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

_FAMILIES: dict[str, Callable[["SpaceSpec"], "FeatureSpace"]] = {}


@dataclass(frozen=True)
class SpaceSpec:
    """Everything needed to build a space and to feed it correctly."""

    name: str
    family: str
    options: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    trainable: bool = False


class FeatureSpace(torch.nn.Module):
    """A frozen feature extractor with provenance for HDF5 attributes."""

    def __init__(self, spec: SpaceSpec, network: torch.nn.Module, dim: int,
                 has_logits: bool = False):
        super().__init__()
        self.spec = spec
        self.network = network
        self.dim = dim
        self.has_logits = has_logits
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureSpace":
        # A space is frozen: keep normalisation layers in inference mode.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.features(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if not self.has_logits:
            raise ValueError(f"space '{self.spec.name}' has no classifier logits")
        return self.network.logits(images)

    def weights_checksum(self) -> str:
        """SHA-256 of the serialised parameters and buffers (first 16 hex digits)."""
        buffer = io.BytesIO()
        state = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        torch.save(state, buffer)
        return hashlib.sha256(buffer.getvalue()).hexdigest()[:16]

    def attributes(self) -> dict[str, Any]:
        return {"space": self.spec.name, "family": self.spec.family, "dim": self.dim,
                "weights_sha256": self.weights_checksum()}


def register_family(name: str):
    def decorator(builder: Callable[[SpaceSpec], FeatureSpace]):
        _FAMILIES[name] = builder
        return builder

    return decorator


def families() -> list[str]:
    return sorted(_FAMILIES)


def build_space(spec: SpaceSpec) -> FeatureSpace:
    """Build a space from its spec, loading weights where the family needs them."""
    if spec.family not in _FAMILIES:
        raise KeyError(
            f"space '{spec.name}': unknown family '{spec.family}'; known families: {families()}"
        )
    return _FAMILIES[spec.family](spec)
