"""HDF5 files for images and features, and atomic writes.

Every file is written under a unique temporary name in the target folder and
renamed into place only after it is complete, so an interrupted job never
leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from fdpipe import __version__

log = logging.getLogger(__name__)


_HOST = socket.gethostname().replace(".", "_")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete temporary files of ``path`` left by killed processes on this host."""
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.{_HOST}.*.tmp"):
        parts = tmp.name[len(path.name) + len(_HOST) + 3 :].split(".")
        if parts and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        log.info("removed %d temporary file(s) of %s left by killed jobs", len(removed), path)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place on success.

    The temporary name contains the host and process id, so concurrent
    writers never share it; those left by killed processes are removed here.
    A failed write deletes its temporary file and re-raises, naming the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is None:
            raise OSError(err.errno, f"writing {path} failed: {err.strerror or err}") from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def _h5_write_errors(path: str | Path) -> Iterator[None]:
    """Re-raise HDF5 write failures (h5py raises OSError or RuntimeError) naming ``path``."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        raise OSError(errno.EIO, f"writing {path} failed: {err}", str(path)) from err


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _set_attrs(target: h5py.AttributeManager, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        target[key] = value if value is not None else ""


def write_images(
    path: str | Path, images: np.ndarray, labels: np.ndarray, **attrs: Any
) -> None:
    """Write uint8 images (N, C, H, W) and int labels (N,) to HDF5."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    with atomic_path(path) as tmp, _h5_write_errors(path):
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("images", data=images, chunks=True, compression="lzf")
            fh.create_dataset("labels", data=labels.astype(np.int64))
            _set_attrs(fh.attrs, {"fdpipe_version": __version__, "count": images.shape[0],
                                  "resolution": images.shape[-1], "channels": images.shape[1],
                                  **attrs})


def read_images(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read images, labels and attributes written by ``write_images``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    with h5py.File(path, "r") as fh:
        for key in ("images", "labels"):
            if key not in fh:
                raise KeyError(f"{path}: missing dataset '{key}'; is this an fdpipe image file?")
        return fh["images"][()], fh["labels"][()], dict(fh.attrs)


def write_features(
    path: str | Path, features: np.ndarray, labels: np.ndarray,
    extra: dict[str, np.ndarray] | None = None, **attrs: Any
) -> None:
    """Write float32 features (N, d), labels, optional extra arrays (such as
    classifier logits) and provenance attributes."""
    if not np.all(np.isfinite(features)):
        bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
        raise ValueError(
            f"refusing to write {path}: features of {bad.size} images are NaN or Inf "
            f"(first image index {bad[0]})"
        )
    with atomic_path(path) as tmp, _h5_write_errors(path):
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("features", data=features.astype(np.float32))
            fh.create_dataset("labels", data=labels.astype(np.int64))
            for name, array in (extra or {}).items():
                fh.create_dataset(name, data=array)
            _set_attrs(fh.attrs, {"fdpipe_version": __version__, "count": features.shape[0],
                                  "dim": features.shape[1], **attrs})


@contextlib.contextmanager
def open_features(path: str | Path) -> Iterator[tuple[h5py.File, dict[str, Any]]]:
    """Open an fdpipe feature file for reading; yield the file and its attributes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature file not found: {path}")
    with h5py.File(path, "r") as fh:
        if "features" not in fh:
            raise KeyError(f"{path}: missing dataset 'features'; is this an fdpipe feature file?")
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in fh.attrs.items()}
        yield fh, attrs


def read_features(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    with open_features(path) as (fh, attrs):
        return fh["features"][()], fh["labels"][()], attrs


def read_dataset(path: str | Path, name: str) -> np.ndarray:
    """Read one named array from an fdpipe HDF5 file."""
    with h5py.File(path, "r") as fh:
        if name not in fh:
            raise KeyError(f"{path}: no dataset '{name}' (found {sorted(fh.keys())})")
        return fh[name][()]


class ImageFileWriter:
    """fdpipe image file written batch by batch; it appears under its name on ``close``."""

    def __init__(self, path: str | Path, image_shape: tuple[int, int, int]):
        self.path = Path(path)
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self.count = 0
        self.image_shape = tuple(image_shape)
        with _h5_write_errors(self.path):
            self.fh = h5py.File(self._tmp, "w")
            self.fh.create_dataset("images", shape=(0, *image_shape), maxshape=(None, *image_shape),
                                   dtype=np.uint8, chunks=(64, *image_shape), compression="lzf")
            self.fh.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64,
                                   chunks=(4096,))

    def append(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.dtype != np.uint8 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"{self.path}: expected uint8 images of shape (N, "
                             f"{', '.join(map(str, self.image_shape))}), got "
                             f"{images.dtype} {images.shape}")
        n = images.shape[0]
        with _h5_write_errors(self.path):
            for name, array in (("images", images), ("labels", labels.astype(np.int64))):
                self.fh[name].resize(self.count + n, axis=0)
                self.fh[name][self.count : self.count + n] = array
        self.count += n

    def abort(self) -> None:
        """Close and delete the temporary file; an existing target stays untouched."""
        try:
            self.fh.close()
        finally:
            self._atomic.__exit__(RuntimeError, RuntimeError(f"writing {self.path} aborted"),
                                  None)

    def close(self, **attrs: Any) -> None:
        """Write the attributes and move the file into place."""
        try:
            with _h5_write_errors(self.path):
                _set_attrs(self.fh.attrs, {"fdpipe_version": __version__, "count": self.count,
                                           "resolution": self.image_shape[-1],
                                           "channels": self.image_shape[0], **attrs})
                self.fh.close()
        except BaseException:
            self.abort()
            raise
        self._atomic.__exit__(None, None, None)
