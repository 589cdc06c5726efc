import gzip

import numpy as np
import pytest

from fdpipe.data import fashion_mnist
from fdpipe.data.idx import read_idx
from fdpipe.data.images import fit_resolution, prepare_split, stratified_subset
from fdpipe.store import read_images
from tests.conftest import write_idx


def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("plain-idx3-ubyte", "zipped-idx3-ubyte.gz"):
        write_idx(tmp_path / name, array)
        np.testing.assert_array_equal(read_idx(tmp_path / name), array)


def test_idx_truncated_names_file(tmp_path):
    path = tmp_path / "cut-idx3-ubyte.gz"
    write_idx(path, np.zeros((4, 5, 5), np.uint8))
    data = gzip.open(path).read()[:-10]
    with gzip.open(path, "wb") as fh:
        fh.write(data)
    with pytest.raises(ValueError, match="truncated IDX file") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_load_split_shapes(fake_fashion_mnist):
    images, labels = fashion_mnist.load_split(fake_fashion_mnist, "train")
    assert images.shape == (800, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (800,)
    assert set(np.unique(labels)) == set(range(10))


def test_missing_dataset_message(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        fashion_mnist.load_split(missing, "test")
    message = str(err.value)
    assert str(missing) in message
    assert "data.root" in message
    assert "fdpipe fetch-data" in message


def test_fit_resolution_pads_centred():
    images = np.full((2, 1, 28, 28), 7, np.uint8)
    out = fit_resolution(images, 32)
    assert out.shape == (2, 1, 32, 32)
    assert out[:, :, 2:30, 2:30].min() == 7
    assert out[:, :, :2].max() == 0
    assert out[:, :, :, 30:].max() == 0


def test_fit_resolution_resizes_down():
    images = np.full((1, 3, 64, 64), 100, np.uint8)
    out = fit_resolution(images, 32)
    assert out.shape == (1, 3, 32, 32)
    assert np.all(out == 100)


def test_stratified_subset_balanced():
    labels = np.repeat(np.arange(10), 50)
    index = stratified_subset(labels, 101, seed=3)
    counts = np.bincount(labels[index], minlength=10)
    assert index.size == 101
    assert counts.max() - counts.min() <= 1
    assert np.array_equal(index, np.unique(index))


def test_prepare_split_writes_h5(fake_fashion_mnist, tmp_path):
    out = tmp_path / "train.h5"
    count = prepare_split(dataset="fashion-mnist", root=fake_fashion_mnist, split="train",
                          resolution=32, out=out, subset=100, seed=0)
    images, labels, attrs = read_images(out)
    assert count == 100
    assert images.shape == (100, 1, 32, 32)
    assert np.bincount(labels).tolist() == [10] * 10
    assert attrs["split"] == "train"
