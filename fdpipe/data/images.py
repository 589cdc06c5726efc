"""Image preparation: pad or resize to the working resolution, uint8 <-> float."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fdpipe.data import fashion_mnist
from fdpipe.store import write_images

log = logging.getLogger(__name__)


def fit_resolution(images: np.ndarray, resolution: int) -> np.ndarray:
    """Pad (centred, with zeros) or resize uint8 (N, C, H, W) images to resolution."""
    n, c, h, w = images.shape
    if h == resolution and w == resolution:
        return images
    if h <= resolution and w <= resolution:
        top, left = (resolution - h) // 2, (resolution - w) // 2
        out = np.zeros((n, c, resolution, resolution), dtype=np.uint8)
        out[:, :, top : top + h, left : left + w] = images
        return out
    x = torch.from_numpy(images).float()
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                      align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def to_unit_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Convert uint8 (N, C, H, W) images to float32 in [0, 1]."""
    x = torch.as_tensor(images)
    return x.float().div_(255.0)


def as_rgb(x: torch.Tensor) -> torch.Tensor:
    """Replicate a single channel to three; leave RGB input unchanged."""
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    return x


def stratified_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Return sorted indices of ``count`` items with classes as balanced as possible."""
    if count >= labels.shape[0]:
        return np.arange(labels.shape[0])
    rng = np.random.default_rng(seed)
    order = rng.permutation(labels.shape[0])
    classes = np.unique(labels)
    per_class = {c: order[labels[order] == c] for c in classes}
    picked: list[np.ndarray] = []
    base, extra = divmod(count, len(classes))
    for i, c in enumerate(classes):
        picked.append(per_class[c][: base + (1 if i < extra else 0)])
    return np.sort(np.concatenate(picked))


def prepare_split(
    *, dataset: str, root: str | Path, split: str, resolution: int, out: str | Path,
    subset: int | None = None, seed: int = 0,
) -> int:
    """Write one dataset split as an fdpipe image file; return the image count."""
    if dataset != "fashion-mnist":
        raise ValueError(f"unknown dataset '{dataset}'; the built-in one is 'fashion-mnist'")
    images, labels = fashion_mnist.load_split(root, split)
    if subset:
        index = stratified_subset(labels, subset, seed)
        images, labels = images[index], labels[index]
        log.info("using a class-balanced subset of %d %s images (seed %d)", len(index), split, seed)
    images = fit_resolution(images[:, None], resolution)
    write_images(out, images, labels, dataset=dataset, split=split, source=str(root), seed=seed)
    log.info("wrote %d images of %dx%d to %s", images.shape[0], resolution, resolution, out)
    return int(images.shape[0])
