"""Image sets: one interface over every source of images that extraction reads.

``open_image_set`` accepts an fdpipe image file (``.h5``), an ADM reference
batch (``.npz``), an image folder, or a manifest (``.json``) written by
``fdpipe prepare`` for a folder or an npz. Every set yields uint8
(B, 3 or 1, H, W) batches with int64 labels, so big sets stream.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from fdpipe.data import npz
from fdpipe.data.decode import BadImageError, BadImages, check_header
from fdpipe.data.folder import FolderImages, read_manifest, scan_folder

log = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """A source of images; ``batches`` streams them, ``attributes`` describes them."""

    path: Path
    kind: str
    count: int
    resolution: int
    _batches: Any = field(repr=False)
    bad: BadImages | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    def batches(self, batch_size: int, skip_batches: int = 0
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield batches, leaving out the first ``skip_batches`` (for resuming)."""
        if skip_batches and self.kind == "h5":
            return self._batches(batch_size, skip_batches)
        # NOTE: other sources still read (and decode) the skipped batches.
        return itertools.islice(self._batches(batch_size), skip_batches, None)

    def attributes(self) -> dict[str, Any]:
        return {"image_file": str(self.path), "image_kind": self.kind,
                "resolution": self.resolution, **self.extra}


def _h5_set(path: Path) -> ImageSet:
    with h5py.File(path, "r") as fh:
        for key in ("images", "labels"):
            if key not in fh:
                raise KeyError(f"{path}: missing dataset '{key}'; is this an fdpipe image file?")
        count, _, _, width = fh["images"].shape

    def batches(batch_size: int, skip_batches: int = 0):
        with h5py.File(path, "r") as fh:
            for start in range(skip_batches * batch_size, count, batch_size):
                yield fh["images"][start : start + batch_size], fh["labels"][start : start + batch_size]

    return ImageSet(path, "h5", int(count), int(width), batches)


def _npz_set(path: Path) -> ImageSet:
    header = npz.read_header(path)
    count, height, width, _ = header.shape
    labels = npz.read_labels(path, count)

    def batches(batch_size: int):
        start = 0
        for images in npz.iter_images(path, batch_size):
            yield images, labels[start : start + images.shape[0]]
            start += images.shape[0]

    return ImageSet(path, "npz", int(count), int(height), batches,
                    extra={"width": int(width)})


def _folder_set(path: Path, root: Path, files: list[str], labels: np.ndarray,
                resolution: int, skip_bad: bool, workers: int | None) -> ImageSet:
    images = FolderImages(root, files, labels, resolution, skip_bad=skip_bad, workers=workers)
    return ImageSet(path, "folder", len(files), int(resolution), images.batches, bad=images.bad,
                    extra={"crop": "adm-centre", "image_root": str(root)})


def _first_short_side(root: Path, files: list[str], skip_bad: bool) -> int:
    # Headers only, so that the conversion notes are logged once, during extraction.
    bad = BadImages(skip_bad)
    for name in files:
        try:
            return min(check_header(root / name))
        except BadImageError as err:
            bad.handle(root / name, str(err).split(": ", 1)[-1])
    raise ValueError(f"{root}: no image with a readable header found")


def open_image_set(path: str | Path, *, resolution: int | None = None, skip_bad: bool = False,
                   workers: int | None = None) -> ImageSet:
    """Open any image source. ``resolution`` sets the ADM crop of folders (default:
    the short side of the first image); .h5 and .npz sets keep their stored size."""
    path = Path(path)
    if path.is_dir():
        files, labels, _ = scan_folder(path)
        if resolution is None:
            resolution = _first_short_side(path, files, skip_bad)
            log.info("%s: cropping to %dx%d, the short side of its first image (set "
                     "--resolution to change it)", path, resolution, resolution)
        return _folder_set(path, path, files, labels, resolution, skip_bad, workers)
    if not path.exists():
        raise FileNotFoundError(f"image source not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return _h5_set(path)
    if suffix == ".npz":
        return _npz_set(path)
    if suffix == ".json":
        manifest = read_manifest(path)
        if manifest["kind"] == "npz":
            return _npz_set(Path(manifest["path"]))
        files = [f for f, _ in manifest["files"]]
        labels = np.asarray([y for _, y in manifest["files"]], dtype=np.int64)
        return _folder_set(path, Path(manifest["root"]), files, labels,
                           resolution or manifest["resolution"], skip_bad, workers)
    raise ValueError(f"{path}: unknown image source; use a folder, an fdpipe image file "
                     f"(.h5), an ADM batch (.npz) or a manifest (.json)")
