"""Image folders: ImageFolder layout (one subfolder per class) or a flat folder.

A manifest (JSON) lists the files and labels of a folder after checking that
each header decodes, so the workflow tracks one small file instead of
copying pixels. Images are decoded, converted to RGB and ADM-centre-cropped
batch by batch when features are extracted.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fdpipe.data.decode import BadImageError, BadImages, ConversionNotes, adm_centre_crop, \
    check_header, open_rgb
from fdpipe.store import atomic_path

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "fdpipe-image-manifest"
MANIFEST_VERSION = 1


def _visible_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return files


def scan_folder(root: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Return (relative file paths, int64 labels, class names) of a folder.

    Subfolders of ``root`` are classes in sorted order (label = index); a
    folder without subfolders is one unlabeled set (labels -1). Hidden files
    and folders are ignored; every other file counts as an image.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if classes and loose:
        raise ValueError(f"{root}: has class subfolders {classes[:3]}... and loose files "
                         f"{loose[:3]}...; use one subfolder per class or a flat folder")
    files: list[str] = []
    labels: list[int] = []
    if not classes:
        files = loose
        labels = [-1] * len(files)
    for label, name in enumerate(classes):
        found = [str(p.relative_to(root)) for p in _visible_files(root / name)]
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"{root}: no image files found")
    return files, np.asarray(labels, dtype=np.int64), classes


def write_manifest(root: str | Path, out: str | Path, *, resolution: int,
                   skip_bad: bool = False, workers: int | None = None) -> dict[str, Any]:
    """Scan a folder, check every header and write the manifest JSON; return it."""
    root = Path(root).resolve()
    files, labels, classes = scan_folder(root)
    bad = BadImages(skip_bad)
    ok = np.ones(len(files), dtype=bool)

    def check(index: int) -> None:
        try:
            check_header(root / files[index])
        except BadImageError as err:
            ok[index] = False
            bad.handle(root / files[index], str(err).split(": ", 1)[-1])

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(check, range(len(files))))
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "kind": "folder",
        "root": str(root), "resolution": int(resolution), "crop": "adm-centre",
        "classes": classes, "count": int(ok.sum()),
        "files": [[f, int(y)] for f, y, keep in zip(files, labels, ok) if keep],
        "bad_files": bad.files,
    }
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(manifest) + "\n")
    bad.write_report(out)
    log.info("wrote a manifest of %d images in %d classes under %s to %s",
             manifest["count"], len(classes), root, out)
    return manifest


def write_npz_manifest(path: str | Path, out: str | Path) -> dict[str, Any]:
    """Check an ADM .npz header and write a manifest that points to it."""
    from fdpipe.data.npz import read_header

    header = read_header(path)
    count, height, width, _ = header.shape
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "kind": "npz",
                "path": str(Path(path).resolve()), "count": int(count),
                "resolution": int(height), "width": int(width)}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(manifest) + "\n")
    log.info("wrote a manifest of %d %dx%d images in %s to %s", count, height, width, path, out)
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}; run `fdpipe prepare` for it")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not an fdpipe image manifest (format = "
                         f"{manifest.get('format')!r})")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest version {manifest.get('version')} is not "
                         f"{MANIFEST_VERSION}; rebuild it with `fdpipe prepare`")
    return manifest


class FolderImages:
    """Decoded, RGB, ADM-centre-cropped images of a file list, in batches."""

    def __init__(self, root: str | Path, files: list[str], labels: np.ndarray, resolution: int,
                 *, skip_bad: bool = False, workers: int | None = None):
        self.root = Path(root)
        self.files = files
        self.labels = labels
        self.resolution = int(resolution)
        self.bad = BadImages(skip_bad)
        self.notes = ConversionNotes()
        self.workers = workers or min(8, os.cpu_count() or 1)

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> np.ndarray | None:
        path = self.root / self.files[index]
        try:
            image = open_rgb(path, self.notes)
        except BadImageError as err:
            self.bad.handle(path, str(err).split(": ", 1)[-1])
            return None
        except FileNotFoundError as err:
            self.bad.handle(path, f"file not found ({err.strerror})")
            return None
        return adm_centre_crop(image, self.resolution)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (uint8 (B, 3, R, R) images, int64 labels); bad files are left out when skipped."""
        with ThreadPoolExecutor(self.workers) as pool:
            for start in range(0, len(self.files), batch_size):
                indices = range(start, min(start + batch_size, len(self.files)))
                arrays = list(pool.map(self._load, indices))
                keep = [i for i, a in zip(indices, arrays) if a is not None]
                if not keep:
                    continue
                batch = np.stack([a for a in arrays if a is not None]).transpose(0, 3, 1, 2)
                yield np.ascontiguousarray(batch), self.labels[keep]
        self.notes.summary()
