"""Feature extraction resumes from the last complete batch after an interruption."""

import h5py
import numpy as np
import pytest
import torch

from fdpipe.features import extract_file
from fdpipe.spaces import SpaceSpec, build_space
from fdpipe.store import read_features, write_images


class Interrupted(Exception):
    pass


class CountingSpace(torch.nn.Module):
    """A pixels space that counts its calls and fails on call ``fail_at``."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.inner = build_space(SpaceSpec("pixels", "pixels", {"size": 4}))
        self.spec = self.inner.spec
        self.dim = self.inner.dim
        self.has_logits = False
        self.network = self.inner.network
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, images):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupted(f"killed during call {self.calls}")
        return self.inner(images)

    def attributes(self):
        return self.inner.attributes()


@pytest.fixture()
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(230, 1, 16, 16), dtype=np.uint8)
    write_images(tmp_path / "images.h5", images, np.arange(230) % 10)
    return tmp_path / "images.h5"


def test_interrupted_extraction_resumes(tmp_path, image_file):
    extract_file(CountingSpace(), image_file, tmp_path / "straight.h5", batch_size=50)

    target = tmp_path / "resumed.h5"
    with pytest.raises(Interrupted):
        extract_file(CountingSpace(fail_at=4), image_file, target, batch_size=50)
    assert not target.exists()
    partial = tmp_path / ".resumed.h5.partial.h5"
    with h5py.File(partial, "r") as fh:
        assert fh.attrs["batches_done"] == 3
        assert fh.attrs["rows_done"] == 150

    space = CountingSpace()
    extract_file(space, image_file, target, batch_size=50)
    assert space.calls == 2  # batches 4 and 5 only
    assert not partial.exists()
    a, labels_a, attrs_a = read_features(tmp_path / "straight.h5")
    b, labels_b, attrs_b = read_features(target)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(labels_a, labels_b)
    assert attrs_b["count"] == 230
    assert "rows_done" not in attrs_b


def test_partial_from_other_settings_discarded(tmp_path, image_file):
    target = tmp_path / "f.h5"
    with pytest.raises(Interrupted):
        extract_file(CountingSpace(fail_at=3), image_file, target, batch_size=50)
    space = CountingSpace()
    extract_file(space, image_file, target, batch_size=40)
    assert space.calls == 6  # all 230 images again, in batches of 40
    assert read_features(target)[0].shape == (230, 16)


def test_corrupt_partial_discarded(tmp_path, image_file):
    target = tmp_path / "f.h5"
    (tmp_path / ".f.h5.partial.h5").write_bytes(b"not an hdf5 file")
    space = CountingSpace()
    extract_file(space, image_file, target, batch_size=50)
    assert space.calls == 5
