"""Sampling a generator into an fdpipe image file plus a PNG grid."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fdpipe.generators.base import check_images
from fdpipe.store import atomic_path, write_images

log = logging.getLogger(__name__)


def balanced_labels(count: int, num_classes: int) -> np.ndarray:
    """Labels 0..K-1 repeated so every class appears count / K times (+1 for some)."""
    if num_classes <= 0:
        return np.zeros(count, dtype=np.int64)
    return np.arange(count, dtype=np.int64) % num_classes


@torch.no_grad()
def sample_images(generator: torch.nn.Module, count: int, steps: int, *, guidance_scale: float = 1.0,
                  batch_size: int = 500, seed: int = 0, device: str | torch.device = "cpu",
                  name: str = "generator") -> tuple[np.ndarray, np.ndarray]:
    """Draw ``count`` images; return uint8 (N, C, H, W) images and their labels."""
    generator = generator.to(device).eval()
    rng = torch.Generator().manual_seed(seed)
    labels = balanced_labels(count, int(generator.num_classes))
    out = np.empty((count, *generator.image_shape), dtype=np.uint8)
    for start in tqdm(range(0, count, batch_size), desc=f"sample {name}", mininterval=5,
                      disable=None):
        stop = min(count, start + batch_size)
        noise = torch.randn((stop - start, *generator.image_shape), generator=rng)
        y = torch.from_numpy(labels[start:stop])
        images = generator.sample(noise.to(device), y.to(device), steps,
                                  guidance_scale=guidance_scale)
        check_images(images, generator.image_shape, name)
        pixels = ((images.float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        out[start:stop] = pixels.numpy()
    return out, labels


def save_grid(path: str | Path, images: np.ndarray, labels: np.ndarray, per_class: int = 8) -> None:
    """Save a PNG grid with one row per class (first ``per_class`` images of each)."""
    from torchvision.utils import make_grid
    from PIL import Image

    rows = []
    for c in np.unique(labels):
        rows.append(images[labels == c][:per_class])
    picked = np.concatenate(rows)
    grid = make_grid(torch.from_numpy(picked), nrow=per_class, padding=2, pad_value=128)
    array = grid.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")


def sample_to_file(generator: torch.nn.Module, out: str | Path, grid: str | Path | None,
                   count: int, steps: int, **kwargs) -> None:
    images, labels = sample_images(generator, count, steps, **kwargs)
    write_images(out, images, labels, steps=steps,
                 guidance_scale=kwargs.get("guidance_scale", 1.0), seed=kwargs.get("seed", 0))
    if grid is not None:
        save_grid(grid, images, labels)
    log.info("wrote %d samples (%d steps) to %s", count, steps, out)
