"""FID-Inception: the Inception-v3 network of FID and the Inception Score.

The architecture and the weight loading come from torch-fidelity
(``FeatureExtractorInceptionV3``, a port of the TensorFlow graph of
2015-12-05). fdpipe feeds it float images in [0, 1] and keeps the path
differentiable: pixels are scaled to [0, 255], resized to 299x299 with
torch-fidelity's TensorFlow-1.x-compatible bilinear resize, mapped to
[-1, 1] by ``(x - 128) / 128`` and passed through the same layers. For uint8
images this matches torch-fidelity's own forward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fdpipe.spaces.base import FeatureSpace, SpaceSpec, register_family
from fdpipe.spaces.weights import check_weights_file, url_weights

INPUT_SIZE = 299
FEATURE_DIM = 2048
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
KNOWN_OPTIONS = {"weights_sha256"}


def _torch_fidelity_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ImportError("the inception space needs the package torch-fidelity; install it "
                          "with `pip install torch-fidelity`") from err
    return FeatureExtractorInceptionV3


def load_torch_fidelity(weights: str | Path):
    """Build torch-fidelity's Inception-v3 with pool features and unbiased logits."""
    cls = _torch_fidelity_class()
    return cls("inception-v3-compat", ["2048", "logits_unbiased"],
               feature_extractor_weights_path=str(weights))


def save_random_weights(path: str | Path, seed: int = 0) -> None:
    """Write randomly initialised Inception-v3 weights in torch-fidelity's format.

    For tests and benchmarks only: the state dict has the same keys and shapes
    as the real file. Batch-norm statistics are randomised too, so that every
    layer does some work.
    """
    cls = _torch_fidelity_class()

    class _Unloaded(cls):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initialisation

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({}, path)  # the constructor reads a file before load_state_dict
    generator = torch.Generator().manual_seed(seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    network = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    torch.random.set_rng_state(state)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(channels, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(channels, generator=generator))
    torch.save(network.state_dict(), path)


class FIDInception(nn.Module):
    """Differentiable wrapper around torch-fidelity's Inception-v3."""

    def __init__(self, network: nn.Module):
        super().__init__()
        from torch_fidelity.interpolate_compat_tensorflow import (
            interpolate_bilinear_2d_like_tensorflow1x,
        )

        self._resize = interpolate_bilinear_2d_like_tensorflow1x
        self.net = network
        # torch-fidelity registers the layers in forward order: stem, Mixed_5b..Mixed_7c,
        # AvgPool, then fc. The agreement test with torch-fidelity's forward guards this.
        self.trunk = [m for name, m in network.named_children() if name != "fc"]

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"inception space expects (B, 1 or 3, H, W) images in [0, 1], "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.float() * 255.0
        x = self._resize(x, size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)
        return (x - 128.0) / 128.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        for module in self.trunk:
            x = module(x)
        return torch.flatten(x, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool features (B, 2048) and logits (B, 1008) from one forward pass."""
        features = self.features(x)
        # Without the bias, as torch-fidelity's 'logits_unbiased' that it uses for the Inception Score.
        return features, features @ self.net.fc.weight.T


class InceptionSpace(FeatureSpace):
    def attributes(self) -> dict[str, Any]:
        return {**super().attributes(), "input_size": INPUT_SIZE,
                "interpolation": "bilinear (TensorFlow 1.x compatible)",
                "normalisation": "(255 x - 128) / 128", "pooling": "avg (pool3)",
                "logits": "1008, unbiased", "weights_file": self.spec.weights or ""}


def _check_options(spec: SpaceSpec, known: set[str]) -> None:
    unknown = sorted(set(spec.options) - known)
    if unknown:
        raise ValueError(f"space '{spec.name}': unknown option(s) {unknown} for family "
                         f"'{spec.family}'; known options: {sorted(known)}")


@register_family("inception")
def build_inception(spec: SpaceSpec) -> InceptionSpace:
    _check_options(spec, KNOWN_OPTIONS)
    if spec.weights:
        path = check_weights_file(spec.name, spec.weights, spec.options.get("weights_sha256"))
    else:
        path = url_weights(spec.name, WEIGHTS_URL)
        if spec.options.get("weights_sha256"):
            check_weights_file(spec.name, path, spec.options["weights_sha256"])
    try:
        network = load_torch_fidelity(path)
    except RuntimeError as err:
        raise ValueError(f"space '{spec.name}': {path} is not an Inception-v3 state dict in "
                         f"torch-fidelity's format ({err}); set spaces.{spec.name}.weights to "
                         f"weights-inception-2015-12-05-6726825d.pth") from err
    resolved = SpaceSpec(spec.name, spec.family, dict(spec.options), str(path), spec.trainable)
    return InceptionSpace(resolved, FIDInception(network), FEATURE_DIM, has_logits=True)
