import errno
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from fdpipe import store
from fdpipe.store import atomic_path, read_features, write_features, write_images


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_round_trip(tmp_path):
    features = np.arange(12, dtype=np.float32).reshape(4, 3)
    write_features(tmp_path / "f.h5", features, np.arange(4), space="pixels")
    read, labels, attrs = read_features(tmp_path / "f.h5")
    np.testing.assert_array_equal(read, features)
    assert attrs["space"] == "pixels"
    assert leftovers(tmp_path) == ["f.h5"]


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    original = h5py.Group.create_dataset

    def fail_on_labels(self, name, *args, **kwargs):
        if name == "labels":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_on_labels)
    target = tmp_path / "features.h5"
    with pytest.raises(OSError) as err:
        write_features(target, np.ones((10, 2), np.float32), np.zeros(10))
    assert str(target) in str(err.value)
    assert "No space left" in str(err.value)
    assert leftovers(tmp_path) == []


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "t.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == ["t.json"]


def test_stale_temporaries_removed(tmp_path):
    target = tmp_path / "x.h5"
    dead = tmp_path / f".x.h5.{store._HOST}.999999999.abcd1234.tmp"
    alive = tmp_path / f".x.h5.{store._HOST}.{os.getpid()}.abcd1234.tmp"
    other_host = tmp_path / ".x.h5.elsewhere.999999999.abcd1234.tmp"
    for path in (dead, alive, other_host):
        path.write_text("partial")
    with atomic_path(target) as tmp:
        tmp.write_text("done")
    assert not dead.exists()
    assert alive.exists()
    assert other_host.exists()
    assert target.read_text() == "done"


WRITE_TO_FULL_DISK = """
import os
import sys
import numpy as np
from fdpipe.store import write_images
images = np.random.default_rng(0).integers(0, 256, size=(600, 1, 32, 32), dtype=np.uint8)
try:
    write_images(sys.argv[1], images, np.zeros(600, np.int64))
except OSError as err:
    print(err, flush=True)
    os._exit(3)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="mounting a tmpfs needs root")
def test_full_tmpfs_leaves_no_truncated_file(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                             str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        target = mount_point / "images.h5"
        # A child process writes, because h5py can crash at interpreter exit after
        # a failed flush, and that must not take the test session with it.
        child = subprocess.run([sys.executable, "-c", WRITE_TO_FULL_DISK, str(target)],
                               capture_output=True, text=True)
        assert child.returncode == 3, child.stdout + child.stderr
        assert "images.h5" in child.stdout
        assert "No space left" in child.stdout
        assert leftovers(mount_point) == []
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)
