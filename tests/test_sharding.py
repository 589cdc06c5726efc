"""Sharded reference statistics against one pass over the same images."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from fdpipe.cli import main
from fdpipe.data.imageset import open_image_set
from fdpipe.evaluate import write_stats
from fdpipe.features import extract_file, stats_of_image_set
from fdpipe.shards import (
    load_shard,
    merge_shard_files,
    save_shard,
    shard_moments,
    shard_range,
)
from fdpipe.spaces import SpaceSpec, build_space
from fdpipe.stats import GaussianStats, Moments
from fdpipe.store import write_images

COUNT = 1000
PIXELS = {"family": "pixels", "options": {"size": 4}}


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def assert_same_stats(merged: GaussianStats, single: GaussianStats) -> None:
    assert merged.n == single.n
    assert relative_error(merged.mu, single.mu) <= 1e-12
    assert relative_error(merged.sigma, single.sigma) <= 1e-12


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(COUNT, 1, 8, 8), dtype=np.uint8)
    # A bright corner whose size depends on the label gives the features structure.
    labels = rng.integers(0, 10, size=COUNT)
    for i, k in enumerate(labels):
        images[i, :, : 1 + k % 4, : 1 + k % 4] = 250
    path = tmp_path_factory.mktemp("images") / "train.h5"
    write_images(path, images, labels)
    return path


@pytest.fixture(scope="module")
def single_pass(image_file, tmp_path_factory):
    """Statistics as the one-shard DAG makes them: extract_real, then stats."""
    out = tmp_path_factory.mktemp("single")
    space = build_space(SpaceSpec("pixels", **PIXELS))
    extract_file(space, image_file, out / "pixels.h5", batch_size=128)
    return write_stats(out / "pixels.h5", out / "pixels.npz")


def test_shard_ranges_tile_and_differ_by_one():
    for shards in (1, 3, 7):
        ranges = [shard_range(COUNT, i, shards) for i in range(shards)]
        assert ranges[0][0] == 0
        assert ranges[-1][1] == COUNT
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = {stop - start for start, stop in ranges}
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="outside 0..2"):
        shard_range(10, 3, 3)


def test_moments_merge_uneven_parts():
    """Parts of very different sizes, with a large common offset, merge to one pass."""
    rng = np.random.default_rng(1)
    features = rng.normal(size=(3000, 24)) @ rng.normal(size=(24, 24)) + 1e3
    single = GaussianStats.from_features(features)
    for sizes in ([3000], [1, 1200, 1799], [2, 3, 500, 1, 1000, 994, 500]):
        bounds = np.cumsum([0, *sizes])
        total = Moments(24)
        for start, stop in zip(bounds, bounds[1:]):
            part = Moments(24)
            part.update(features[start:stop])
            total.merge(part)
        assert_same_stats(GaussianStats.from_moments(total), single)


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_h5_shards_match_single_pass(image_file, single_pass, tmp_path, shards):
    space = build_space(SpaceSpec("pixels", **PIXELS))
    image_set = open_image_set(image_file)
    paths = []
    for index in range(shards):
        moments, attrs = shard_moments(space, image_set, index, shards, batch_size=64)
        assert moments.count == attrs["stop"] - attrs["start"]
        paths.append(tmp_path / f"{index}-of-{shards}.npz")
        save_shard(paths[-1], moments, attrs)
    merged = merge_shard_files(paths[::-1])
    assert_same_stats(merged, single_pass)
    for key in ("space", "dim", "resolution", "image_file"):
        assert merged.attrs[key] == single_pass.attrs[key], key
    assert merged.attrs["shards"] == shards


def test_npz_and_folder_shards_match_single_pass(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(23, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "batch.npz", arr_0=images)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    space = build_space(SpaceSpec("pixels", **PIXELS))
    for source in (tmp_path / "batch.npz", folder):
        image_set = open_image_set(source, resolution=8)
        single, _ = stats_of_image_set({"pixels": space}, image_set, batch_size=4)
        parts = [shard_moments(space, image_set, i, 3, batch_size=4) for i in range(3)]
        assert [m.count for m, _ in parts] == [7, 8, 8]
        for i, (moments, attrs) in enumerate(parts):
            save_shard(tmp_path / f"{i}.npz", moments, attrs)
        merged = merge_shard_files([tmp_path / f"{i}.npz" for i in range(3)])
        assert_same_stats(merged, single["pixels"])


def test_merge_rejects_incomplete_or_mixed_shards(image_file, tmp_path):
    space = build_space(SpaceSpec("pixels", **PIXELS))
    image_set = open_image_set(image_file)
    for shards in (3, 2):
        for index in range(shards):
            save_shard(tmp_path / f"{index}-of-{shards}.npz",
                       *shard_moments(space, image_set, index, shards, batch_size=500))
    with pytest.raises(ValueError, match=r"indices \[0, 2\].*3 shards"):
        merge_shard_files([tmp_path / "0-of-3.npz", tmp_path / "2-of-3.npz"])
    with pytest.raises(ValueError, match="has shards = 2"):
        merge_shard_files([tmp_path / "0-of-3.npz", tmp_path / "1-of-2.npz",
                           tmp_path / "2-of-3.npz"])
    with pytest.raises(FileNotFoundError, match="no-such.npz"):
        load_shard(tmp_path / "no-such.npz")


def test_cli_extract_shard_and_merge(image_file, single_pass, tmp_path):
    spec = json.dumps(PIXELS)
    shards = []
    for index in range(3):
        shards.append(str(tmp_path / f"{index}.npz"))
        assert main(["extract-shard", "--space", "pixels", "--spec", spec, "--images",
                     str(image_file), "--shard", str(index), "--shards", "3", "--device", "cpu",
                     "--batch-size", "100", "--out", shards[-1]]) == 0
    assert main(["merge-stats", "--shards", *shards, "--out", str(tmp_path / "pixels.npz")]) == 0
    assert_same_stats(GaussianStats.load(tmp_path / "pixels.npz", expect_space="pixels"),
                      single_pass)
    # A shard index outside the split is an error naming the range.
    assert main(["extract-shard", "--space", "pixels", "--spec", spec, "--images",
                 str(image_file), "--shard", "3", "--shards", "3", "--device", "cpu",
                 "--out", str(tmp_path / "bad.npz")]) == 1


def test_sharded_dag_replaces_stats_jobs(tmp_path):
    from tests.test_workflow import REPO, planned_jobs, snakemake

    config = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    config["evaluation"]["shards"] = 3
    path = tmp_path / "sharded.yaml"
    path.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(snakemake(tmp_path, "-n", "--configfile", str(path)).stdout)
    # Train statistics of 3 spaces, 3 shards each; valfd still reads the test features.
    assert jobs["extract_shard"] == 9
    assert jobs["merge_stats"] == 3
    assert "stats" not in jobs
    assert jobs["extract_real"] == 3
