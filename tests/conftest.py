"""Shared fixtures: a small fake Fashion-MNIST in IDX format, tiny spaces."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in IDX format (gzipped when the name ends in .gz)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(payload)


def make_fake_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent blobs: class k is a bright rectangle whose size grows with k."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(count, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        half = 3 + int(k)
        images[i, 14 - half : 14 + half, 14 - half // 2 : 14 + half // 2] = 200
    return images, labels.astype(np.uint8)


@pytest.fixture(scope="session")
def fake_fashion_mnist(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fashion-mnist")
    for prefix, count, seed in (("train", 800, 0), ("t10k", 300, 1)):
        images, labels = make_fake_images(count, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root
