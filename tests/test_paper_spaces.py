"""FID-Inception and timm spaces, built with random weights loaded from a file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fdpipe.cli import _space_from_spec
from fdpipe.store import file_sha256

timm = pytest.importorskip("timm")
pytest.importorskip("torch_fidelity")

from timm.data import resolve_model_data_config  # noqa: E402

from fdpipe.spaces.inception import load_torch_fidelity, save_random_weights  # noqa: E402

# (model, model_kwargs, pooling): a ViT with a class token, a ViT with an
# attention pool (SigLIP-like) and a ConvNeXt, shrunk to run in milliseconds.
TIMM_CASES = {
    "vit-cls": ("vit_tiny_patch16_224", {"depth": 2}, "cls"),
    "vit-avg": ("vit_tiny_patch16_224", {"depth": 2}, "avg"),
    "siglip-map": ("vit_base_patch16_siglip_224", {"depth": 2, "embed_dim": 64, "num_heads": 2},
                   "cls"),
    "convnext-avg": ("convnextv2_atto", {}, "avg"),
}
SIZE = 32


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    save_random_weights(path, seed=3)
    return path


@pytest.fixture(scope="module")
def inception_space(inception_weights):
    return _space_from_spec("inception", {"family": "inception",
                                          "weights": str(inception_weights)})


def uint8_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)


def test_inception_matches_torch_fidelity(inception_space, inception_weights):
    images = uint8_images(2, 40)
    reference = load_torch_fidelity(inception_weights)
    ref_features, ref_logits = reference(images)
    features, logits = inception_space.network.features_and_logits(images.float() / 255.0)
    assert features.shape == (2, 2048)
    assert logits.shape == (2, 1008)
    assert float(ref_features.abs().max()) > 0
    assert float((features - ref_features).abs().max()) <= 1e-5
    assert float((logits - ref_logits).abs().max()) <= 1e-5
    torch.testing.assert_close(inception_space(images.float() / 255.0), features)


def test_inception_gray_and_gradient(inception_space):
    gray = torch.rand(2, 1, 24, 24)
    torch.testing.assert_close(inception_space(gray), inception_space(gray.expand(-1, 3, -1, -1)))
    x = torch.rand(2, 3, 24, 24, requires_grad=True)
    inception_space(x).square().sum().backward()
    assert x.grad is not None
    assert float(x.grad.abs().sum()) > 0
    assert inception_space.has_logits
    assert not any(p.requires_grad for p in inception_space.parameters())


def test_inception_attributes(inception_space, inception_weights):
    attrs = inception_space.attributes()
    assert attrs["input_size"] == 299
    assert attrs["family"] == "inception"
    assert attrs["dim"] == 2048
    assert attrs["weights_file"] == str(inception_weights)


def test_inception_checksum_checked(inception_weights):
    good = file_sha256(inception_weights)
    space = _space_from_spec("inc", {"family": "inception", "weights": str(inception_weights),
                                     "weights_sha256": good[:12]})
    assert space.dim == 2048
    with pytest.raises(ValueError) as err:
        _space_from_spec("inc", {"family": "inception", "weights": str(inception_weights),
                                 "weights_sha256": "0" * 64})
    assert "spaces.inc.weights_sha256" in str(err.value)
    assert good in str(err.value)


@pytest.mark.parametrize("family", ["inception", "timm"])
def test_missing_weights_file_named(family, tmp_path):
    missing = tmp_path / "absent.pth"
    spec = {"family": family, "weights": str(missing)}
    if family == "timm":
        spec["options"] = {"model": "vit_tiny_patch16_224"}
    with pytest.raises(FileNotFoundError) as err:
        _space_from_spec("mine", spec)
    assert str(missing) in str(err.value)
    assert "spaces.mine.weights" in str(err.value)


def test_offline_inception_names_download(tmp_path, monkeypatch):
    monkeypatch.setenv("FDPIPE_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(FileNotFoundError) as err:
        _space_from_spec("fid", {"family": "inception"})
    message = str(err.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert "spaces.fid.weights" in message


def test_offline_hub_names_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FDPIPE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        _space_from_spec("dino", {"family": "timm",
                                  "options": {"model": "vit_large_patch14_dinov2.lvd142m"}})
    message = str(err.value)
    assert "timm/vit_large_patch14_dinov2.lvd142m" in message
    assert "model.safetensors" in message
    assert "spaces.dino.weights" in message


def save_timm(case: str, path) -> torch.nn.Module:
    name, kwargs, _ = TIMM_CASES[case]
    torch.manual_seed(0)
    extra = {"img_size": SIZE} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, **extra, **kwargs).eval()
    torch.save(model.state_dict(), path)  # with the classifier, like the published files
    model.reset_classifier(0)
    return model


def timm_space(case: str, path):
    name, kwargs, pooling = TIMM_CASES[case]
    return _space_from_spec(case, {"family": "timm", "weights": str(path), "options": {
        "model": name, "model_kwargs": kwargs, "pooling": pooling, "input_size": SIZE}})


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_space_pooling_and_shapes(case, tmp_path):
    reference = save_timm(case, tmp_path / "w.pth")
    space = timm_space(case, tmp_path / "w.pth")
    config = resolve_model_data_config(reference)
    x = torch.rand(3, 3, SIZE, SIZE)
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = reference.forward_features((x - mean) / std)
        features = space(x)
    pooling = TIMM_CASES[case][2]
    if tokens.ndim == 4 or pooling == "cls":
        expected = reference.forward_head(tokens, pre_logits=True)
    else:
        expected = tokens[:, reference.num_prefix_tokens:].mean(dim=1)
    assert features.shape == (3, space.dim)
    assert space.dim == expected.shape[1]
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    if case == "vit-cls":
        torch.testing.assert_close(features, tokens[:, 0], rtol=1e-4, atol=1e-5)
    if case == "siglip-map":
        assert reference.attn_pool is not None
        assert not torch.allclose(features, tokens.mean(dim=1), atol=1e-4)


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_preprocessing_recorded(case, tmp_path):
    reference = save_timm(case, tmp_path / "w.pth")
    space = timm_space(case, tmp_path / "w.pth")
    config = resolve_model_data_config(reference)
    attrs = space.attributes()
    assert attrs["input_size"] == SIZE
    assert attrs["mean"] == pytest.approx(list(config["mean"]), abs=1e-7)
    assert attrs["std"] == pytest.approx(list(config["std"]), abs=1e-7)
    assert attrs["interpolation"].startswith(config["interpolation"])
    assert attrs["pooling"] == TIMM_CASES[case][2]
    assert attrs["model"] == TIMM_CASES[case][0]


def test_timm_resizes_with_antialias(tmp_path):
    save_timm("vit-cls", tmp_path / "w.pth")
    space = timm_space("vit-cls", tmp_path / "w.pth")
    big = torch.rand(2, 3, 48, 48)
    small = F.interpolate(big, size=(SIZE, SIZE), mode="bicubic", antialias=True,
                          align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(space(big), space(small))
        gray = torch.rand(2, 1, SIZE, SIZE)
        torch.testing.assert_close(space(gray), space(gray.expand(-1, 3, -1, -1)))


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_gradient_reaches_input(case, tmp_path):
    save_timm(case, tmp_path / "w.pth")
    space = timm_space(case, tmp_path / "w.pth")
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    space(x).square().sum().backward()
    assert x.grad is not None
    assert float(x.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in space.parameters())


def test_timm_cls_needs_token_or_pool(tmp_path):
    save_timm("convnext-avg", tmp_path / "w.pth")
    spec = {"family": "timm", "weights": str(tmp_path / "w.pth"),
            "options": {"model": "convnextv2_atto", "pooling": "cls"}}
    with pytest.raises(ValueError) as err:
        _space_from_spec("cnx", spec)
    assert "spaces.cnx.options.pooling" in str(err.value)


def test_timm_unknown_option_rejected(tmp_path):
    spec = {"family": "timm", "weights": str(tmp_path / "w.pth"),
            "options": {"model": "convnextv2_atto", "poolnig": "avg"}}
    with pytest.raises(ValueError) as err:
        _space_from_spec("cnx", spec)
    assert "poolnig" in str(err.value)


def test_timm_wrong_weights_named(tmp_path):
    save_timm("convnext-avg", tmp_path / "w.pth")
    spec = {"family": "timm", "weights": str(tmp_path / "w.pth"),
            "options": {"model": "vit_tiny_patch16_224", "input_size": SIZE}}
    with pytest.raises(ValueError) as err:
        _space_from_spec("vit", spec)
    assert str(tmp_path / "w.pth") in str(err.value)
