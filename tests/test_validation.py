"""Bad inputs stop with a message that names the file, key or value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fdpipe.evaluate import frechet_distance_of_file, write_stats
from fdpipe.frechet import StatisticsError
from fdpipe.generators import load_generator
from fdpipe.generators.flow import FlowConfig, FlowMLP, save_flow
from fdpipe.sample import sample_images
from fdpipe.stats import GaussianStats
from fdpipe.store import write_features


def features_file(path, dim=4, space="pixels", resolution=32, count=50, seed=0):
    rng = np.random.default_rng(seed)
    write_features(path, rng.normal(size=(count, dim)).astype(np.float32),
                   np.zeros(count, np.int64), space=space, resolution=resolution)
    return path


def stats_file(path, **arrays):
    np.savez(path, **arrays)
    return path


GOOD_MU = np.zeros(4)
GOOD_SIGMA = np.eye(4)


@pytest.mark.parametrize("arrays, fragments", [
    ({"mu": GOOD_MU}, ["missing key(s) ['sigma']"]),
    ({"mu": GOOD_MU, "sigma": np.eye(3)}, ["(4,)", "(3, 3)"]),
    ({"mu": np.zeros(6), "sigma": np.eye(6)}, ["dimension 6", "4-d features"]),
    ({"mu": GOOD_MU, "sigma": np.diag([1.0, np.nan, 1.0, 1.0])}, ["NaN or Inf"]),
    ({"mu": GOOD_MU, "sigma": np.triu(np.ones((4, 4)))}, ["not symmetric"]),
])
def test_bad_statistics_file_named(tmp_path, arrays, fragments):
    features = features_file(tmp_path / "f.h5")
    stats = stats_file(tmp_path / "bad_stats.npz", **arrays)
    with pytest.raises(StatisticsError) as err:
        frechet_distance_of_file(features, stats)
    message = str(err.value)
    assert "bad_stats.npz" in message
    for fragment in fragments:
        assert fragment in message


def test_statistics_of_other_space_named(tmp_path):
    write_stats(features_file(tmp_path / "a.h5", space="mae"), tmp_path / "s.npz")
    with pytest.raises(StatisticsError) as err:
        frechet_distance_of_file(features_file(tmp_path / "b.h5", space="pixels"),
                                 tmp_path / "s.npz")
    assert "s.npz" in str(err.value)
    assert "'mae'" in str(err.value)


def test_statistics_of_other_resolution_named(tmp_path):
    write_stats(features_file(tmp_path / "a.h5", resolution=64), tmp_path / "s.npz")
    with pytest.raises(ValueError) as err:
        frechet_distance_of_file(features_file(tmp_path / "b.h5", resolution=32),
                                 tmp_path / "s.npz")
    assert "s.npz" in str(err.value)
    assert "resolution" in str(err.value)


def test_indefinite_statistics_rejected(tmp_path):
    sigma = np.diag([1.0, 1.0, 1.0, -0.5])
    stats = stats_file(tmp_path / "neg.npz", mu=GOOD_MU, sigma=sigma)
    with pytest.raises(StatisticsError, match="indefinite|negative"):
        GaussianStats.load(stats).frechet_distance_to(GOOD_MU, GOOD_SIGMA)


def test_generator_checkpoint_mismatch_named(tmp_path):
    save_flow(tmp_path / "small.pt", FlowMLP(FlowConfig(resolution=8, hidden=16, blocks=1)))
    state = torch.load(tmp_path / "small.pt", weights_only=False)
    state["config"]["hidden"] = 32
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(ValueError) as err:
        load_generator("fdpipe.generators.flow:build_flow", str(tmp_path / "edited.pt"))
    assert "edited.pt" in str(err.value)
    assert "do not match" in str(err.value)


def test_generator_wrong_shape_named():
    model = load_generator("tests.plugin_generator:build_wrong_shape", None)
    with pytest.raises(ValueError) as err:
        sample_images(model, 4, 1, name="tiny")
    assert "tiny" in str(err.value)
    assert "(4, 1, 4, 4)" in str(err.value)
    assert "(B, 1, 8, 8)" in str(err.value)


def test_generator_nan_output_named():
    model = load_generator("tests.plugin_generator:build", None, {"resolution": 8})
    with torch.no_grad():
        model.linear.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="tiny"):
        sample_images(model, 4, 1, name="tiny")


def test_generator_without_protocol_named():
    with pytest.raises(TypeError, match="no 'image_shape'"):
        load_generator("torch.nn:Identity", None)
