"""Feature extraction: run an image file through a space and store features."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fdpipe.data.images import to_unit_float
from fdpipe.spaces import FeatureSpace
from fdpipe.store import read_images, write_features

log = logging.getLogger(__name__)


@torch.no_grad()
def extract(space: FeatureSpace, images: np.ndarray, *, batch_size: int = 500,
            device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray | None]:
    """Return float32 features (N, d) and, when the space has them, logits (N, K)."""
    space = space.to(device)
    features = np.empty((images.shape[0], space.dim), dtype=np.float32)
    logits: list[np.ndarray] = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc=f"extract {space.spec.name}",
                      mininterval=5, disable=None):
        x = to_unit_float(images[start : start + batch_size]).to(device)
        out = space(x)
        if not torch.isfinite(out).all():
            raise FloatingPointError(
                f"space '{space.spec.name}' returned NaN or Inf features for images "
                f"{start}..{start + x.shape[0] - 1}"
            )
        features[start : start + x.shape[0]] = out.float().cpu().numpy()
        if space.has_logits:
            logits.append(space.logits(x).float().cpu().numpy())
    return features, (np.concatenate(logits) if logits else None)


def extract_file(space: FeatureSpace, images_path: str | Path, out: str | Path, *,
                 batch_size: int = 500, device: str | torch.device = "cpu") -> None:
    images, labels, attrs = read_images(images_path)
    features, logits = extract(space, images, batch_size=batch_size, device=device)
    extra = {"logits": logits} if logits is not None else {}
    write_features(out, features, labels, image_file=str(images_path),
                   resolution=int(images.shape[-1]), **space.attributes(), extra=extra)
    log.info("wrote %s features of %d images to %s", space.spec.name, images.shape[0], out)
