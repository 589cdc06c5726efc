"""Fashion-MNIST: locate, fetch and read the train (60k) and test (10k) splits."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from fdpipe.data.idx import read_idx

log = logging.getLogger(__name__)

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
SPLIT_SIZE = {"train": 60000, "test": 10000}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fdpipe" / "fashion-mnist"


def _split_files(root: Path, split: str) -> tuple[Path, Path] | None:
    prefix = SPLIT_PREFIX[split]
    for suffix in (".gz", ""):
        images = root / f"{prefix}-images-idx3-ubyte{suffix}"
        labels = root / f"{prefix}-labels-idx1-ubyte{suffix}"
        if images.exists() and labels.exists():
            return images, labels
    return None


def has_dataset(root: Path) -> bool:
    return all(_split_files(root, split) for split in SPLIT_PREFIX)


def load_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return uint8 images (N, 28, 28) and int64 labels (N,) of one split."""
    if split not in SPLIT_PREFIX:
        raise ValueError(f"unknown Fashion-MNIST split '{split}'; use one of {list(SPLIT_PREFIX)}")
    root = Path(root)
    files = _split_files(root, split)
    if files is None:
        prefix = SPLIT_PREFIX[split]
        raise FileNotFoundError(
            f"Fashion-MNIST {split} split not found in '{root}' (expected "
            f"{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]); "
            f"set data.root in the config to the folder that holds them, or run "
            f"`fdpipe fetch-data` to install or download them"
        )
    images = read_idx(files[0])
    labels = read_idx(files[1]).astype(np.int64)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{files[0]}: {images.shape[0]} images but {labels.shape[0]} labels in {files[1]}"
        )
    return images.astype(np.uint8), labels


def fetch(root: str | Path | None = None) -> Path:
    """Make Fashion-MNIST available and return the folder that contains it.

    Order: an explicit ``root`` that already has the files, the Debian package
    location, ``apt-get install dataset-fashion-mnist`` when running as root
    with apt, and finally a torchvision download into the cache folder.
    """
    candidates = [Path(root)] if root else []
    candidates += [DEBIAN_ROOT, default_cache_root()]
    for candidate in candidates:
        if has_dataset(candidate):
            log.info("Fashion-MNIST found in %s", candidate)
            return candidate
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        log.info("installing the Debian package %s", DEBIAN_PACKAGE)
        result = subprocess.run(
            ["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE], capture_output=True, text=True
        )
        if result.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            result = subprocess.run(
                ["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE], capture_output=True, text=True
            )
        if result.returncode == 0 and has_dataset(DEBIAN_ROOT):
            return DEBIAN_ROOT
        log.warning("apt-get install %s failed: %s", DEBIAN_PACKAGE, result.stderr.strip()[-500:])
    target = Path(root) if root else default_cache_root()
    log.info("downloading Fashion-MNIST into %s", target)
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(str(target / "_torchvision"), train=train, download=True)
    raw = target / "_torchvision" / "FashionMNIST" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for path in raw.glob("*-ubyte*"):
        shutil.copy2(path, target / path.name)
    if not has_dataset(target):
        raise FileNotFoundError(f"download finished but the IDX files are missing in {target}")
    return target
