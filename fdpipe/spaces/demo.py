"""Small spaces for the Fashion-MNIST experiment.

Trained on the train split by the pipeline: a supervised classifier, the
encoder of a masked autoencoder and a SimCLR-style contrastive encoder.
Controls: downsampled raw pixels and a randomly initialised CNN.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fdpipe.spaces.base import FeatureSpace, SpaceSpec, register_family

TRAINED_FAMILIES = ("classifier", "mae", "simclr")


class ConvEncoder(nn.Module):
    """Three stride-2 convolutions, then a linear map to ``dim`` features."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), dim: int = 128,
                 resolution: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(8, width), width),
                       nn.SiLU()]
            channels = width
        self.body = nn.Sequential(*layers)
        side = resolution // 2 ** len(widths)
        self.head = nn.Linear(channels * side * side, dim)
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              antialias=True, align_corners=False)
        x = (x - 0.5) / 0.5
        return self.head(self.body(x).flatten(1))


class Classifier(nn.Module):
    """Encoder plus a linear classifier; features are the activated embedding."""

    def __init__(self, num_classes: int = 10, **encoder_kw):
        super().__init__()
        self.encoder = ConvEncoder(**encoder_kw)
        self.classifier = nn.Linear(self.encoder.head.out_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.encoder(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    forward = logits


class MaskedAutoencoder(nn.Module):
    """Convolutional masked autoencoder: random patches are hidden from the
    encoder and the decoder reconstructs them. Features use the full image."""

    def __init__(self, patch: int = 4, mask_ratio: float = 0.75, **encoder_kw):
        super().__init__()
        self.encoder = ConvEncoder(**encoder_kw)
        self.patch = patch
        self.mask_ratio = mask_ratio
        dim = self.encoder.head.out_features
        res = self.encoder.resolution
        self.decoder = nn.Sequential(
            nn.Linear(dim, 64 * (res // 4) ** 2), nn.Unflatten(1, (64, res // 4, res // 4)),
            nn.SiLU(), nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean squared reconstruction error on the masked patches of gray x in [0, 1]."""
        b, _, h, w = x.shape
        gh, gw = h // self.patch, w // self.patch
        keep = torch.rand(b, 1, gh, gw, generator=generator, device=x.device) >= self.mask_ratio
        keep = keep.float().repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)
        recon = self.decoder(self.encoder(x * keep))
        target = x.mean(1, keepdim=True)
        hidden = 1.0 - keep
        return ((recon - target) ** 2 * hidden).sum() / hidden.sum().clamp_min(1.0)


class ContrastiveEncoder(nn.Module):
    """SimCLR-style encoder with a projection head used only in training."""

    def __init__(self, projection_dim: int = 64, **encoder_kw):
        super().__init__()
        self.encoder = ConvEncoder(**encoder_kw)
        dim = self.encoder.head.out_features
        self.projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim), nn.SiLU(),
                                        nn.Linear(dim, projection_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class Pixels(nn.Module):
    """Gray pixels, average-pooled to ``size`` x ``size`` and flattened."""

    def __init__(self, size: int = 16):
        super().__init__()
        self.size = size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        gray = x.mean(1, keepdim=True)
        return F.adaptive_avg_pool2d(gray, self.size).flatten(1)


class RandomCNN(nn.Module):
    def __init__(self, seed: int = 0, **encoder_kw):
        super().__init__()
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.encoder = ConvEncoder(**encoder_kw)
        torch.random.set_rng_state(state)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def encoder_options(options: dict) -> dict:
    return {"widths": tuple(options.get("widths", (32, 64, 128))),
            "dim": int(options.get("dim", 128)),
            "resolution": int(options.get("resolution", 32))}


def make_network(family: str, options: dict) -> nn.Module:
    kw = encoder_options(options)
    if family == "classifier":
        return Classifier(num_classes=int(options.get("num_classes", 10)), **kw)
    if family == "mae":
        return MaskedAutoencoder(patch=int(options.get("patch", 4)),
                                 mask_ratio=float(options.get("mask_ratio", 0.75)), **kw)
    if family == "simclr":
        return ContrastiveEncoder(projection_dim=int(options.get("projection_dim", 64)), **kw)
    raise KeyError(f"no trainable demo network called '{family}'")


def load_trained(spec: SpaceSpec) -> nn.Module:
    network = make_network(spec.family, spec.options)
    if not spec.weights:
        raise ValueError(f"space '{spec.name}': no weights file given; train it first "
                         f"(`fdpipe train-encoder`) or set spaces.{spec.name}.weights")
    path = Path(spec.weights)
    if not path.exists():
        raise FileNotFoundError(
            f"space '{spec.name}': weights file {path} not found; run `fdpipe train-encoder "
            f"--space {spec.name}` (or the Snakemake rule train_encoder) to create it"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"space '{spec.name}': weights in {path} do not match a '{spec.family}' network "
            f"with options {spec.options}: {err}"
        ) from err
    return network


def _build_trained(spec: SpaceSpec) -> FeatureSpace:
    network = load_trained(spec)
    dim = int(spec.options.get("dim", 128))
    return FeatureSpace(spec, network, dim, has_logits=spec.family == "classifier")


for _family in TRAINED_FAMILIES:
    register_family(_family)(_build_trained)


@register_family("pixels")
def build_pixels(spec: SpaceSpec) -> FeatureSpace:
    size = int(spec.options.get("size", 16))
    return FeatureSpace(spec, Pixels(size), size * size)


@register_family("random_cnn")
def build_random_cnn(spec: SpaceSpec) -> FeatureSpace:
    kw = encoder_options(spec.options)
    network = RandomCNN(seed=int(spec.options.get("seed", 0)), **kw)
    return FeatureSpace(spec, network, kw["dim"])
