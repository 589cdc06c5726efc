"""Sampling a generator into an fdpipe image file plus a PNG grid."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from fdpipe.generators.base import check_images
from fdpipe.store import ImageFileWriter, atomic_path

log = logging.getLogger(__name__)


def balanced_labels(count: int, num_classes: int) -> np.ndarray:
    """Labels 0..K-1 repeated so every class appears count / K times (+1 for some)."""
    if num_classes <= 0:
        return np.zeros(count, dtype=np.int64)
    return np.arange(count, dtype=np.int64) % num_classes


@torch.no_grad()
def iter_samples(generator: torch.nn.Module, count: int, steps: int, *,
                 guidance_scale: float = 1.0, batch_size: int = 500, seed: int = 0,
                 device: str | torch.device = "cpu", name: str = "generator"
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield batches of uint8 (n, C, H, W) images and their labels, ``count`` in all."""
    generator = generator.to(device).eval()
    rng = torch.Generator().manual_seed(seed)
    labels = balanced_labels(count, int(generator.num_classes))
    for start in tqdm(range(0, count, batch_size), desc=f"sample {name}", mininterval=5,
                      disable=None):
        stop = min(count, start + batch_size)
        noise = torch.randn((stop - start, *generator.image_shape), generator=rng)
        y = torch.from_numpy(labels[start:stop])
        images = generator.sample(noise.to(device), y.to(device), steps,
                                  guidance_scale=guidance_scale)
        check_images(images, generator.image_shape, name)
        pixels = ((images.float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        yield pixels.numpy(), labels[start:stop]


def sample_images(generator: torch.nn.Module, count: int, steps: int, **kwargs
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``count`` images into memory; return uint8 (N, C, H, W) images and labels."""
    batches = list(iter_samples(generator, count, steps, **kwargs))
    return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))


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
    """Sample ``count`` images into an fdpipe image file, batch by batch, plus a PNG grid.

    Only the images for the grid (the first 8 per class, at most 200) stay in memory.
    """
    writer = ImageFileWriter(out, tuple(generator.image_shape))
    kept_images: list[np.ndarray] = []
    kept_labels: list[np.ndarray] = []
    kept = 0
    try:
        for images, labels in iter_samples(generator, count, steps, **kwargs):
            writer.append(images, labels)
            if kept < 200:
                kept_images.append(images[: 200 - kept])
                kept_labels.append(labels[: 200 - kept])
                kept += kept_images[-1].shape[0]
    except BaseException:
        writer.abort()
        raise
    writer.close(steps=steps, guidance_scale=kwargs.get("guidance_scale", 1.0),
                 seed=kwargs.get("seed", 0))
    if grid is not None:
        save_grid(grid, np.concatenate(kept_images), np.concatenate(kept_labels))
    log.info("wrote %d samples (%d steps) to %s", count, steps, out)
