"""Feature extraction: run an image set through spaces, streaming in batches.

Images come from any source that ``open_image_set`` reads (fdpipe .h5, ADM
.npz, an image folder or a manifest). Features go to an HDF5 file written
batch by batch, or straight into float64 moments for reference statistics,
so no stage holds a whole image set in memory.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch
from tqdm import tqdm

from fdpipe import __version__
from fdpipe.data.images import to_unit_float
from fdpipe.data.imageset import ImageSet, open_image_set
from fdpipe.spaces import FeatureSpace
from fdpipe.stats import GaussianStats, Moments
from fdpipe.store import atomic_path

log = logging.getLogger(__name__)


def space_outputs(space: FeatureSpace, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features and (for spaces with logits) logits, from one pass where the network allows."""
    if not space.has_logits:
        return space(x), None
    both = getattr(space.network, "features_and_logits", None)
    if both is not None:
        return both(x)
    return space(x), space.logits(x)


def _check_finite(space: FeatureSpace, out: torch.Tensor, first: int) -> None:
    if not torch.isfinite(out).all():
        raise FloatingPointError(
            f"space '{space.spec.name}' returned NaN or Inf features for images "
            f"{first}..{first + out.shape[0] - 1}"
        )


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


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
        out, out_logits = space_outputs(space, x)
        _check_finite(space, out, start)
        features[start : start + x.shape[0]] = out.float().cpu().numpy()
        if out_logits is not None:
            logits.append(out_logits.float().cpu().numpy())
    return features, (np.concatenate(logits) if logits else None)


@torch.no_grad()
def iter_features(spaces: dict[str, FeatureSpace], image_set: ImageSet, *, batch_size: int = 500,
                  device: str | torch.device = "cpu", bf16: bool = False
                  ) -> Iterator[tuple[dict[str, tuple[np.ndarray, np.ndarray | None]], np.ndarray]]:
    """Yield ({space: (float32 features, logits or None)}, labels) per batch of images."""
    device = torch.device(device)
    for space in spaces.values():
        space.to(device)
    seen = 0
    names = ", ".join(spaces)
    for images, labels in tqdm(image_set.batches(batch_size), desc=f"extract {names}",
                               total=-(-image_set.count // batch_size), mininterval=5,
                               disable=None):
        x = to_unit_float(images).to(device)
        outputs = {}
        for name, space in spaces.items():
            with _autocast(device, bf16):
                out, out_logits = space_outputs(space, x)
            _check_finite(space, out, seen)
            outputs[name] = (out.float().cpu().numpy(),
                             None if out_logits is None else out_logits.float().cpu().numpy())
        seen += images.shape[0]
        yield outputs, np.asarray(labels, dtype=np.int64)


class FeatureFileWriter:
    """HDF5 feature file (features, labels, optional logits, attributes), appended per batch."""

    def __init__(self, path: str | Path, dim: int, num_logits: int | None):
        self.path = Path(path)
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self.fh = h5py.File(self._tmp, "w")
        self.count = 0
        self.fh.create_dataset("features", shape=(0, dim), maxshape=(None, dim),
                               dtype=np.float32, chunks=(256, dim))
        self.fh.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64,
                               chunks=(4096,))
        if num_logits:
            self.fh.create_dataset("logits", shape=(0, num_logits), maxshape=(None, num_logits),
                                   dtype=np.float32, chunks=(256, num_logits))

    def append(self, features: np.ndarray, labels: np.ndarray, logits: np.ndarray | None) -> None:
        n = features.shape[0]
        pairs = [("features", features), ("labels", labels)]
        if logits is not None:
            pairs.append(("logits", logits))
        for name, array in pairs:
            dataset = self.fh[name]
            dataset.resize(self.count + n, axis=0)
            dataset[self.count : self.count + n] = array
        self.count += n

    def abort(self) -> None:
        """Close and delete the temporary file; an existing target stays untouched."""
        self.fh.close()
        error = RuntimeError(f"writing {self.path} aborted")
        self._atomic.__exit__(RuntimeError, error, None)

    def close(self, attrs: dict[str, Any]) -> None:
        """Write the attributes and move the file into place."""
        try:
            for key, value in {"fdpipe_version": __version__, "count": self.count,
                               "dim": self.fh["features"].shape[1], **attrs}.items():
                self.fh.attrs[key] = value if value is not None else ""
        except BaseException:
            self.abort()
            raise
        self.fh.close()
        self._atomic.__exit__(None, None, None)


def extract_file(space: FeatureSpace, images_path: str | Path, out: str | Path, *,
                 batch_size: int = 500, device: str | torch.device = "cpu",
                 skip_bad: bool = False, resolution: int | None = None) -> int:
    """Extract the features of any image source into ``out``; return the image count."""
    image_set = open_image_set(images_path, resolution=resolution, skip_bad=skip_bad)
    writer = None
    try:
        for outputs, labels in iter_features({space.spec.name: space}, image_set,
                                             batch_size=batch_size, device=device):
            features, logits = outputs[space.spec.name]
            if writer is None:
                writer = FeatureFileWriter(out, features.shape[1],
                                           None if logits is None else logits.shape[1])
            writer.append(features, labels, logits)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        raise ValueError(f"{images_path}: no images to extract")
    writer.close({**image_set.attributes(), **space.attributes()})
    if image_set.bad is not None:
        image_set.bad.write_report(out)
    log.info("wrote %s features of %d images to %s", space.spec.name, writer.count, out)
    return writer.count


def stats_of_image_set(spaces: dict[str, FeatureSpace], image_set: ImageSet, *,
                       batch_size: int = 500, device: str | torch.device = "cpu",
                       bf16: bool = False) -> tuple[dict[str, GaussianStats], dict[str, np.ndarray]]:
    """Float64 statistics per space of one pass over the images, and logits where present."""
    moments = {name: Moments(space.dim) for name, space in spaces.items()}
    logits: dict[str, list[np.ndarray]] = {}
    for outputs, _ in iter_features(spaces, image_set, batch_size=batch_size, device=device,
                                    bf16=bf16):
        for name, (features, out_logits) in outputs.items():
            moments[name].update(features)
            if out_logits is not None:
                logits.setdefault(name, []).append(out_logits)
    stats = {}
    for name, space in spaces.items():
        if moments[name].count < 2:
            raise ValueError(f"{image_set.path}: {moments[name].count} image(s) decoded; "
                             f"statistics need at least 2")
        attrs = {**image_set.attributes(), **space.attributes()}
        keep = ("space", "family", "dim", "weights_sha256", "resolution", "image_file", "model",
                "input_size", "pooling")
        stats[name] = GaussianStats.from_moments(moments[name],
                                                 **{k: attrs[k] for k in keep if k in attrs})
    return stats, {name: np.concatenate(parts) for name, parts in logits.items()}
