import numpy as np
import pytest
import torch

from fdpipe.spaces import SpaceSpec, build_space, families
from fdpipe.spaces.demo import TRAINED_FAMILIES, make_network
from fdpipe.spaces.training import EncoderTrainConfig, augment, nt_xent, train_encoder

TINY = {"dim": 16, "widths": [4, 8, 8]}


def save_random_weights(family: str, path, options=TINY) -> None:
    torch.manual_seed(1)
    torch.save({"state_dict": make_network(family, options).state_dict()}, path)


@pytest.mark.parametrize("family", TRAINED_FAMILIES)
def test_trained_family_loads_saved_weights(family, tmp_path):
    path = tmp_path / f"{family}.pt"
    save_random_weights(family, path)
    space = build_space(SpaceSpec(family, family, TINY, weights=str(path)))
    x = torch.rand(5, 3, 32, 32, requires_grad=True)
    features = space(x)
    assert features.shape == (5, 16)
    assert space.dim == 16
    features.square().sum().backward()
    assert x.grad is not None
    assert float(x.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in space.parameters())
    reference = make_network(family, TINY)
    reference.load_state_dict(torch.load(path)["state_dict"])
    torch.testing.assert_close(space(x.detach()), reference.features(x.detach()))


def test_gray_input_matches_replicated_rgb(tmp_path):
    path = tmp_path / "c.pt"
    save_random_weights("classifier", path)
    space = build_space(SpaceSpec("c", "classifier", TINY, weights=str(path)))
    gray = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(space(gray), space(gray.expand(-1, 3, -1, -1)))
    assert space.logits(gray).shape == (3, 10)


def test_missing_weights_message(tmp_path):
    missing = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError) as err:
        build_space(SpaceSpec("mine", "mae", TINY, weights=str(missing)))
    assert str(missing) in str(err.value)
    assert "train-encoder" in str(err.value)


def test_mismatched_weights_message(tmp_path):
    path = tmp_path / "c.pt"
    save_random_weights("classifier", path)
    with pytest.raises(ValueError, match="do not match"):
        build_space(SpaceSpec("c", "classifier", {"dim": 32, "widths": [4, 8, 8]},
                              weights=str(path)))


def test_unknown_family_lists_known():
    with pytest.raises(KeyError) as err:
        build_space(SpaceSpec("x", "inceptoin"))
    assert "inceptoin" in str(err.value)
    assert "classifier" in str(err.value)


def test_pixels_is_average_pool():
    space = build_space(SpaceSpec("p", "pixels", {"size": 4}))
    x = torch.rand(2, 3, 32, 32)
    expected = x.mean(1).reshape(2, 4, 8, 4, 8).mean(dim=(2, 4)).reshape(2, 16)
    torch.testing.assert_close(space(x), expected)


def test_random_cnn_fixed_by_seed():
    a = build_space(SpaceSpec("r", "random_cnn", {**TINY, "seed": 5}))
    b = build_space(SpaceSpec("r", "random_cnn", {**TINY, "seed": 5}))
    c = build_space(SpaceSpec("r", "random_cnn", {**TINY, "seed": 6}))
    assert a.weights_checksum() == b.weights_checksum()
    assert a.weights_checksum() != c.weights_checksum()


def test_every_family_registered():
    assert set(families()) >= {"classifier", "mae", "simclr", "pixels", "random_cnn"}


def test_nt_xent_identical_views_beat_random():
    z = torch.randn(8, 4)
    aligned = nt_xent(z, z, 0.1)
    shuffled = nt_xent(z, torch.randn(8, 4), 0.1)
    assert aligned < shuffled


def test_augment_keeps_range_and_shape():
    x = torch.rand(6, 3, 32, 32)
    views = augment(x, torch.Generator().manual_seed(0))
    assert views.shape == x.shape
    assert float(views.min()) >= 0.0
    assert float(views.max()) <= 1.0


def test_classifier_training_beats_chance():
    rng = np.random.default_rng(0)
    labels = np.arange(400) % 2
    images = rng.integers(0, 30, size=(400, 1, 32, 32)).astype(np.uint8)
    images[labels == 1, :, 8:24, 8:24] = 220
    net, metrics = train_encoder("classifier", TINY, images[:300], labels[:300], images[300:],
                                 labels[300:], EncoderTrainConfig(epochs=2, batch_size=50))
    assert metrics["test_accuracy"] > 0.9
