"""Generator protocol and loading by import path.

A generator is a ``torch.nn.Module`` with

- ``image_shape``: tuple (C, H, W) of the images it produces;
- ``num_classes``: int, the number of class labels (0 for unconditional);
- ``sample(noise, labels, steps, guidance_scale=1.0)``: noise of shape
  (B, C, H, W), int64 labels of shape (B,), returns images in [-1, 1] of
  shape (B, C, H, W). With ``steps=1`` the call must be differentiable with
  respect to the module's parameters, because FD-loss trains that path.

A factory is any importable callable ``package.module:function`` taking
``checkpoint`` (a path or None) plus keyword options and returning such a
module with its weights loaded.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def resolve_factory(path: str):
    """Import ``package.module:function`` and return the callable."""
    if ":" not in path:
        raise ValueError(
            f"generator factory '{path}' must have the form 'package.module:function'"
        )
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"generator factory '{path}': cannot import module '{module_name}' ({err}); "
            f"check generator.factory in the config and that the module is on PYTHONPATH"
        ) from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise AttributeError(
            f"generator factory '{path}': module '{module_name}' has no attribute '{attr}'"
        ) from err


def load_generator(factory: str, checkpoint: str | None, options: dict[str, Any] | None = None
                   ) -> torch.nn.Module:
    """Build a generator through its factory and check that it follows the protocol."""
    build = resolve_factory(factory)
    model = build(checkpoint=checkpoint, **(options or {}))
    check_generator(model, name=factory)
    return model


def check_generator(model: Any, name: str = "generator") -> None:
    for attr in ("image_shape", "num_classes", "sample"):
        if not hasattr(model, attr):
            raise TypeError(f"{name}: the generator has no '{attr}'; see the generator "
                            f"protocol in fdpipe/generators/base.py")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{name}: the generator must be a torch.nn.Module, got {type(model)}")


def check_images(images: torch.Tensor, expected_shape: tuple[int, ...], name: str) -> None:
    """Raise if generated images have the wrong shape or leave [-1, 1] by more than 1e-3."""
    if tuple(images.shape[1:]) != tuple(expected_shape):
        raise ValueError(f"{name}: sample() returned shape {tuple(images.shape)}, expected "
                         f"(B, {', '.join(map(str, expected_shape))})")
    if not torch.isfinite(images).all():
        raise FloatingPointError(f"{name}: sample() returned NaN or Inf values")
    low, high = float(images.min()), float(images.max())
    if low < -1.001 or high > 1.001:
        raise ValueError(f"{name}: sample() returned values in [{low:.3g}, {high:.3g}]; "
                         f"the protocol requires images in [-1, 1]")


def load_run_generator(path: str, use_ema: bool = True) -> torch.nn.Module:
    """Load a generator fine-tuned by ``fdpipe finetune`` (its EMA weights by default)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "generator" not in state:
        raise ValueError(f"{path}: not an fdpipe fine-tuning checkpoint (no 'generator' entry)")
    source = state["generator"]
    model = load_generator(source["factory"], source.get("checkpoint"), source.get("options"))
    weights = state["ema_state_dict"] if use_ema else state["state_dict"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the generator built by "
                         f"{source['factory']}: {err}") from err
    return model
