"""Feature extraction: run an image set through spaces, streaming in batches.

Images come from any source that ``open_image_set`` reads (fdpipe .h5, ADM
.npz, an image folder or a manifest). Features go to an HDF5 file written
batch by batch, or straight into float64 moments for reference statistics,
so no stage holds a whole image set in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
                  device: str | torch.device = "cpu", bf16: bool = False,
                  skip_batches: int = 0, first_row: int = 0
                  ) -> Iterator[tuple[dict[str, tuple[np.ndarray, np.ndarray | None]], np.ndarray]]:
    """Yield ({space: (float32 features, logits or None)}, labels) per batch of images.

    The first ``skip_batches`` batches are read but not run through the spaces;
    ``first_row`` is the index of the first image yielded (for error messages).
    """
    device = torch.device(device)
    for space in spaces.values():
        space.to(device)
    seen = first_row
    names = ", ".join(spaces)
    batches = image_set.batches(batch_size, skip_batches=skip_batches)
    for images, labels in tqdm(batches, desc=f"extract {names}",
                               total=-(-image_set.count // batch_size), initial=skip_batches,
                               mininterval=5, disable=None):
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


class PartialFeatureFile:
    """Feature file written batch by batch to ``.<name>.partial.h5`` next to the target.

    After every batch it records how many batches and rows are complete, so a
    killed extraction resumes from the last complete batch when started again
    with the same image set, space and batch size (``key``). ``finish`` renames
    it to the target name.
    """

    def __init__(self, path: str | Path, key: str):
        self.path = Path(path)
        self.partial = self.path.with_name(f".{self.path.name}.partial.h5")
        self.key = key
        self.fh: h5py.File | None = None
        self.rows = 0
        self.batches = 0
        self.bad_files: list[dict[str, str]] = []

    def resume(self) -> int:
        """Open a matching partial file; return the number of complete batches (0 if none)."""
        if not self.partial.exists():
            return 0
        try:
            fh = h5py.File(self.partial, "a")
        except OSError as err:
            log.warning("discarding unreadable partial file %s: %s", self.partial, err)
            self.partial.unlink()
            return 0
        if fh.attrs.get("resume_key") != self.key or "features" not in fh:
            log.warning("discarding %s: it was written for other inputs or settings",
                        self.partial)
            fh.close()
            self.partial.unlink()
            return 0
        self.fh = fh
        self.rows = int(fh.attrs["rows_done"])
        self.batches = int(fh.attrs["batches_done"])
        self.bad_files = json.loads(fh.attrs.get("bad_files", "[]"))
        for name in ("features", "labels", "logits"):
            if name in fh:
                fh[name].resize(self.rows, axis=0)
        log.info("resuming %s after %d complete batches (%d images)", self.path, self.batches,
                 self.rows)
        return self.batches

    def _create(self, dim: int, num_logits: int | None) -> None:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        fh = h5py.File(self.partial, "w")
        fh.create_dataset("features", shape=(0, dim), maxshape=(None, dim), dtype=np.float32,
                          chunks=(256, dim))
        fh.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
        if num_logits:
            fh.create_dataset("logits", shape=(0, num_logits), maxshape=(None, num_logits),
                              dtype=np.float32, chunks=(256, num_logits))
        fh.attrs["resume_key"] = self.key
        self.fh = fh

    def append(self, features: np.ndarray, labels: np.ndarray, logits: np.ndarray | None,
               bad_files: list[dict[str, str]]) -> None:
        if self.fh is None:
            self._create(features.shape[1], None if logits is None else logits.shape[1])
        n = features.shape[0]
        pairs = [("features", features), ("labels", labels)]
        if logits is not None:
            pairs.append(("logits", logits))
        for name, array in pairs:
            dataset = self.fh[name]
            dataset.resize(self.rows + n, axis=0)
            dataset[self.rows : self.rows + n] = array
        self.rows += n
        self.batches += 1
        self.bad_files = list(bad_files)
        self.fh.attrs["rows_done"] = self.rows
        self.fh.attrs["batches_done"] = self.batches
        self.fh.attrs["bad_files"] = json.dumps(self.bad_files)
        self.fh.flush()

    def finish(self, attrs: dict[str, Any]) -> None:
        if self.fh is None:
            raise ValueError(f"no features were written for {self.path}")
        for key, value in {"fdpipe_version": __version__, "count": self.rows,
                           "dim": self.fh["features"].shape[1], **attrs}.items():
            self.fh.attrs[key] = value if value is not None else ""
        for key in ("resume_key", "rows_done", "batches_done", "bad_files"):
            del self.fh.attrs[key]
        self.fh.close()
        self.fh = None
        os.replace(self.partial, self.path)

    def close(self) -> None:
        """Close without finishing; the partial file stays for the next attempt."""
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def _resume_key(image_set: ImageSet, space: FeatureSpace, batch_size: int) -> str:
    payload = {"images": image_set.attributes(), "count": image_set.count,
               "space": space.attributes(), "batch_size": batch_size}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def extract_file(space: FeatureSpace, images_path: str | Path, out: str | Path, *,
                 batch_size: int = 500, device: str | torch.device = "cpu",
                 skip_bad: bool = False, resolution: int | None = None) -> int:
    """Extract the features of any image source into ``out``; return the image count.

    Resumes from the last complete batch of an interrupted run (see
    ``PartialFeatureFile``).
    """
    image_set = open_image_set(images_path, resolution=resolution, skip_bad=skip_bad)
    writer = PartialFeatureFile(out, _resume_key(image_set, space, batch_size))
    done = writer.resume()
    bad_before = list(writer.bad_files)
    try:
        for outputs, labels in iter_features({space.spec.name: space}, image_set,
                                             batch_size=batch_size, device=device,
                                             skip_batches=done, first_row=writer.rows):
            features, logits = outputs[space.spec.name]
            bad_now = image_set.bad.files if image_set.bad is not None else []
            # Skipped batches of a folder are decoded again, so their bad files repeat.
            unique = {entry["file"]: entry for entry in bad_before + bad_now}
            writer.append(features, labels, logits, list(unique.values()))
        if writer.rows == 0:
            raise ValueError(f"{images_path}: no images to extract")
        writer.finish({**image_set.attributes(), **space.attributes()})
    finally:
        writer.close()
    if image_set.bad is not None:
        image_set.bad.files = writer.bad_files
        image_set.bad.write_report(out)
    log.info("wrote %s features of %d images to %s", space.spec.name, writer.rows, out)
    return writer.rows


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
