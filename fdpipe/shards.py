"""Reference statistics computed in shards that merge exactly.

A large image set is cut into ``shards`` contiguous ranges whose sizes differ
by at most one image. Each shard job runs its range through a space and saves
float64 moments (count, mean, centred second moment) to an .npz file;
``merge_shard_files`` folds them together with ``Moments.merge``, the
parallel update, so the merged mean and covariance equal those of one pass
over all images up to float64 round-off.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch

from fdpipe.data import npz
from fdpipe.data.folder import FolderImages, read_manifest, scan_folder
from fdpipe.data.imageset import ImageSet
from fdpipe.features import iter_features
from fdpipe.spaces import FeatureSpace
from fdpipe.stats import GaussianStats, Moments
from fdpipe.store import atomic_path

log = logging.getLogger(__name__)

SHARD_FORMAT = "fdpipe-moments-shard"
# Attributes that every shard of one statistics file must share; the merged
# statistics keep them, as single-pass statistics do.
SHARED_ATTRS = ("space", "family", "dim", "weights_sha256", "resolution", "image_file")


def shard_range(count: int, index: int, shards: int) -> tuple[int, int]:
    """Return [start, stop) of shard ``index`` of ``shards`` over ``count`` items."""
    if shards < 1:
        raise ValueError(f"the shard count must be at least 1, got {shards}")
    if not 0 <= index < shards:
        raise ValueError(f"shard index {index} is outside 0..{shards - 1}")
    return index * count // shards, (index + 1) * count // shards


def _h5_rows(path: Path, start: int, stop: int):
    def batches(batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with h5py.File(path, "r") as fh:
            for first in range(start, stop, batch_size):
                last = min(first + batch_size, stop)
                yield fh["images"][first:last], fh["labels"][first:last]

    return batches


def _npz_rows(path: Path, start: int, stop: int):
    labels = npz.read_labels(path, npz.read_header(path).shape[0])

    def batches(batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        first = start
        for images in npz.iter_images(path, batch_size, start=start):
            images = images[: stop - first]
            yield images, labels[first : first + images.shape[0]]
            first += images.shape[0]
            if first >= stop:
                break

    return batches


def _skipped_rows(all_batches, start: int, stop: int):
    """Batches of rows [start, stop) cut from a source that can only stream from its start."""

    def batches(batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        seen = 0
        for images, labels in all_batches(batch_size):
            first, seen = seen, seen + images.shape[0]
            if seen <= start:
                continue
            if first >= stop:
                break
            keep = slice(max(start - first, 0), min(stop, seen) - first)
            yield images[keep], labels[keep]

    return batches


def _folder_files(image_set: ImageSet) -> tuple[Path, list[str], np.ndarray]:
    if image_set.path.is_dir():
        files, labels, _ = scan_folder(image_set.path)
        return image_set.path, files, labels
    manifest = read_manifest(image_set.path)
    files = [f for f, _ in manifest["files"]]
    labels = np.asarray([y for _, y in manifest["files"]], dtype=np.int64)
    return Path(manifest["root"]), files, labels


def select_shard(image_set: ImageSet, index: int, shards: int, *,
                 skip_bad: bool = False) -> ImageSet:
    """Return the images of shard ``index`` of ``shards`` as an image set.

    The shard keeps the attributes of the whole set (its ``image_file`` names
    the whole set), so merged statistics describe the set, not a shard.
    """
    start, stop = shard_range(image_set.count, index, shards)
    bad = None
    if image_set.kind == "h5":
        batches = _h5_rows(image_set.path, start, stop)
    elif image_set.kind == "folder":
        root, files, labels = _folder_files(image_set)
        images = FolderImages(root, files[start:stop], labels[start:stop], image_set.resolution,
                              skip_bad=skip_bad)
        batches, bad = images.batches, images.bad
    elif image_set.kind == "npz":
        batches = _npz_rows(image_set.path, start, stop)
    else:
        # Any other source streams from its start: earlier shards' images are
        # read and dropped, but not run through the space.
        batches = _skipped_rows(image_set.batches, start, stop)
    return ImageSet(image_set.path, image_set.kind, stop - start, image_set.resolution,
                    batches, bad=bad, extra=dict(image_set.extra))


def shard_moments(space: FeatureSpace, image_set: ImageSet, index: int, shards: int, *,
                  batch_size: int = 500, device: str | torch.device = "cpu",
                  skip_bad: bool = False) -> tuple[Moments, dict[str, Any]]:
    """Return the float64 moments of one shard's features and the shard's attributes."""
    start, stop = shard_range(image_set.count, index, shards)
    shard = select_shard(image_set, index, shards, skip_bad=skip_bad)
    moments = Moments(space.dim)
    for outputs, _ in iter_features({space.spec.name: space}, shard, batch_size=batch_size,
                                    device=device):
        moments.update(outputs[space.spec.name][0])
    attrs = {**image_set.attributes(), **space.attributes(), "format": SHARD_FORMAT,
             "shard": index, "shards": shards, "start": start, "stop": stop,
             "image_count": image_set.count}
    if shard.bad is not None:
        attrs["bad_images"] = len(shard.bad.files)
    return moments, attrs


def save_shard(path: str | Path, moments: Moments, attrs: dict[str, Any]) -> None:
    """Write one shard's moments and attributes to an .npz file."""
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, count=np.int64(moments.count), mean=moments.mean, m2=moments.m2,
                     attrs=np.array(json.dumps(attrs, sort_keys=True)))


def load_shard(path: str | Path) -> tuple[Moments, dict[str, Any]]:
    """Read a file written by ``save_shard``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"shard file not found: {path}; run `fdpipe extract-shard` "
                                f"for it")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("count", "mean", "m2", "attrs") if k not in data.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; not a shard written by "
                             f"`fdpipe extract-shard`")
        attrs = json.loads(str(data["attrs"]))
        moments = Moments.from_state_dict({"count": int(data["count"]), "mean": data["mean"],
                                           "m2": data["m2"]})
    if attrs.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path}: format is {attrs.get('format')!r}, not {SHARD_FORMAT!r}")
    return moments, attrs


def _check_shards(shards: list[tuple[Path, dict[str, Any]]]) -> None:
    """Raise unless the shards are one complete, consistent split of one image set."""
    first_path, first = shards[0]
    for path, attrs in shards[1:]:
        for key in (*SHARED_ATTRS, "shards", "image_count"):
            if attrs.get(key) != first.get(key):
                raise ValueError(f"{path} has {key} = {attrs.get(key)!r} but {first_path} has "
                                 f"{first.get(key)!r}; merge shards of one image set and space")
    expected = first["shards"]
    indices = sorted(attrs["shard"] for _, attrs in shards)
    if indices != list(range(expected)):
        raise ValueError(f"got shard indices {indices} but the split has {expected} shards "
                         f"(0..{expected - 1}), each once; pass every shard file")
    covered = 0
    for _, attrs in sorted(shards, key=lambda item: item[1]["shard"]):
        if attrs["start"] != covered:
            raise ValueError(f"shard {attrs['shard']} starts at image {attrs['start']}, "
                             f"expected {covered}; recompute the shards with one shard count")
        covered = attrs["stop"]
    if covered != first["image_count"]:
        raise ValueError(f"the shards cover {covered} of {first['image_count']} images")


def merge_shard_files(paths: list[str | Path]) -> GaussianStats:
    """Merge shard files into the statistics of the whole image set."""
    if not paths:
        raise ValueError("no shard files to merge")
    loaded = [(Path(p), *load_shard(p)) for p in paths]
    _check_shards([(path, attrs) for path, _, attrs in loaded])
    total = Moments(loaded[0][1].dim)
    for _, moments, _ in sorted(loaded, key=lambda item: item[2]["shard"]):
        total.merge(moments)
    first = loaded[0][2]
    if total.count < 2:
        raise ValueError(f"the shards hold {total.count} feature vector(s) of "
                         f"{first['image_file']}; statistics need at least 2")
    attrs = {k: first[k] for k in SHARED_ATTRS if k in first}
    return GaussianStats.from_moments(total, **attrs, shards=len(loaded))
