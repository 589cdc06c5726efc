"""ADM reference-batch ``.npz`` files: ``arr_0`` uint8 images (N, H, W, 3).

The images of a reference batch (and of sample exports in the same format)
are read and written in batches straight from the zip member, so a 50k x
256 x 256 x 3 batch (9.8 GB) never has to fit in memory. Precomputed
Inception statistics (``mu``, ``sigma``) in such a file are read by
``GaussianStats.load``; optional labels are read from ``arr_1``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from fdpipe.store import atomic_path

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"


@dataclass(frozen=True)
class NpzHeader:
    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    members: tuple[str, ...]


def _read_header(fh) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(shape), dtype, fortran


def read_header(path: str | Path) -> NpzHeader:
    """Check that ``path`` contains uint8 NHWC RGB images under arr_0; return their shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path}: not an .npz (zip) file: {err}") from err
    with archive:
        members = tuple(n[:-4] for n in archive.namelist() if n.endswith(".npy"))
        if IMAGES_KEY not in members:
            raise KeyError(f"{path}: no '{IMAGES_KEY}' array (found {list(members)}); an ADM "
                           f"reference batch keeps its uint8 images (N, H, W, 3) there")
        with archive.open(f"{IMAGES_KEY}.npy") as fh:
            shape, dtype, fortran = _read_header(fh)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3) or fortran:
        raise ValueError(f"{path}: '{IMAGES_KEY}' is {dtype} with shape {shape}"
                         f"{' (Fortran order)' if fortran else ''}; expected C-ordered uint8 "
                         f"(N, H, W, 3)")
    return NpzHeader(path, shape, dtype, members)


def read_labels(path: str | Path, count: int) -> np.ndarray:
    """Labels from arr_1 when it has one integer per image, else -1 for every image."""
    with np.load(path, allow_pickle=False) as data:
        if LABELS_KEY in data.files:
            labels = np.asarray(data[LABELS_KEY])
            if labels.shape == (count,) and np.issubdtype(labels.dtype, np.integer):
                return labels.astype(np.int64)
    return np.full(count, -1, dtype=np.int64)


def iter_images(path: str | Path, batch_size: int, start: int = 0
                ) -> Iterator[np.ndarray]:
    """Yield uint8 (B, 3, H, W) batches of arr_0, reading the zip member sequentially."""
    header = read_header(path)
    count, height, width, channels = header.shape
    per_image = height * width * channels
    with zipfile.ZipFile(path) as archive, archive.open(f"{IMAGES_KEY}.npy") as fh:
        _read_header(fh)
        if start:
            _skip(fh, start * per_image)
        for first in range(start, count, batch_size):
            n = min(batch_size, count - first)
            data = fh.read(n * per_image)
            if len(data) != n * per_image:
                raise ValueError(f"{path}: '{IMAGES_KEY}' ends after {first + len(data) // per_image}"
                                 f" of {count} images; the file is truncated")
            batch = np.frombuffer(data, dtype=np.uint8).reshape(n, height, width, channels)
            if channels == 1:
                batch = np.repeat(batch, 3, axis=3)
            yield np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def _skip(fh, nbytes: int) -> None:
    while nbytes > 0:
        chunk = fh.read(min(nbytes, 1 << 24))
        if not chunk:
            raise ValueError("unexpected end of the npz member while seeking")
        nbytes -= len(chunk)


class NpzImageWriter:
    """Write arr_0 (N, H, W, 3) uint8 batch by batch into an uncompressed .npz.

    The count must be known up front because the .npy header stores the shape.
    The file appears under its final name only after ``close`` succeeds.
    """

    def __init__(self, path: str | Path, count: int, height: int, width: int,
                 labels: np.ndarray | None = None):
        self.path = Path(path)
        self.shape = (count, height, width, 3)
        self.labels = labels
        self.written = 0
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED,
                                    allowZip64=True)
        self._member = self._zip.open(f"{IMAGES_KEY}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                  "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self._member, header)

    def write(self, images_nchw: np.ndarray) -> None:
        if images_nchw.dtype != np.uint8 or images_nchw.shape[1:] != (3, *self.shape[1:3]):
            raise ValueError(f"{self.path}: batch is {images_nchw.dtype} "
                             f"{images_nchw.shape}; expected uint8 (B, 3, {self.shape[1]}, "
                             f"{self.shape[2]})")
        if self.written + images_nchw.shape[0] > self.shape[0]:
            raise ValueError(f"{self.path}: more than the announced {self.shape[0]} images")
        self._member.write(np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1)).tobytes())
        self.written += images_nchw.shape[0]

    def close(self) -> None:
        self._member.close()
        try:
            if self.written != self.shape[0]:
                raise ValueError(f"{self.path}: wrote {self.written} images but announced "
                                 f"{self.shape[0]}")
            if self.labels is not None:
                with self._zip.open(f"{LABELS_KEY}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asarray(self.labels, dtype=np.int64))
            self._zip.close()
        except BaseException as err:
            self._zip.close()
            self._atomic.__exit__(type(err), err, err.__traceback__)
            raise
        self._atomic.__exit__(None, None, None)
