"""timm spaces: any timm image model as a frozen, differentiable feature extractor.

Preprocessing follows the model's own pretrained config
(``timm.data.resolve_model_data_config``): mean, std and interpolation. Images
are resized to the input size with antialiasing (no centre crop: the whole
image is used). The input size is the ``input_size`` option, else the fixed
image size of a ViT's patch embedding, else the pretrained config's.

Pooling:

- ``cls``: the model's own pooled output, which is the class token after the
  final norm for ViTs built with ``global_pool='token'`` and the attention
  pool for models with ``global_pool='map'`` (SigLIP). Models without either
  are rejected.
- ``avg``: the mean of the patch tokens (prefix tokens such as the class token
  and registers excluded) for token models; for convolutional models such as
  ConvNeXt the model's own head pooling (global average, then the head norm).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fdpipe.spaces.base import FeatureSpace, SpaceSpec, register_family
from fdpipe.spaces.inception import _check_options
from fdpipe.spaces.weights import check_weights_file, hub_weights

log = logging.getLogger(__name__)

KNOWN_OPTIONS = {"model", "pooling", "input_size", "model_kwargs", "weights_sha256"}
POOLINGS = ("cls", "avg")


def create_model(name: str, weights_file: str | None, model_kwargs: dict[str, Any],
                 input_size: int | None) -> nn.Module:
    """Create a timm model, load weights from a file when given, drop the classifier.

    The model is built with its pretrained number of classes so that timm
    loads the file strictly (with another class count timm drops the
    classifier and loads non-strictly, leaving missing layers random); the
    classifier is removed afterwards. When ``input_size`` is set, it is passed
    as ``img_size`` to models that take one (ViTs resample their position
    embedding on load) and ignored by the rest.
    """
    import timm

    kwargs = {key: value for key, value in model_kwargs.items() if key != "num_classes"}
    if weights_file:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights_file)},
                      pretrained_strict=True)
    model = None
    if input_size is not None and "img_size" not in kwargs:
        try:
            model = timm.create_model(name, img_size=input_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    if model is None:
        model = timm.create_model(name, **kwargs)
    model.reset_classifier(0)
    return model.eval()


class TimmFeatures(nn.Module):
    """Resize, normalise, run the model and pool, all differentiable."""

    def __init__(self, model: nn.Module, pooling: str, input_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], interpolation: str):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.input_size = input_size
        self.interpolation = interpolation
        self.mean_values = tuple(float(v) for v in mean)
        self.std_values = tuple(float(v) for v in std)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"timm space expects (B, 1 or 3, H, W) images in [0, 1], got "
                             f"shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size),
                              mode=self.interpolation, antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(self.preprocess(x))
        if self.pooling == "cls" or tokens.ndim == 4:
            return self.model.forward_head(tokens, pre_logits=True)
        prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        return tokens[:, prefix:].mean(dim=1)  # [B, N, D] -> [B, D]


def _interpolation(value: str) -> str:
    # timm names PIL filters; torch's interpolate has bilinear and bicubic with antialiasing.
    if value in ("bilinear", "bicubic"):
        return value
    log.warning("timm interpolation %r has no antialiased torch equivalent; using bicubic", value)
    return "bicubic"


def _check_pooling(spec: SpaceSpec, model: nn.Module, pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"space '{spec.name}': options.pooling = {pooling!r} is not allowed; "
                         f"use one of {POOLINGS}")
    own_pool = getattr(model, "global_pool", None)
    if pooling == "cls" and own_pool not in ("token", "map"):
        raise ValueError(f"space '{spec.name}': model {spec.options['model']} has no class token "
                         f"or attention pool (global_pool = {own_pool!r}); set "
                         f"spaces.{spec.name}.options.pooling to 'avg'")


def _input_size(model: nn.Module, option: int | None, data_config: dict[str, Any]) -> int:
    if option is not None:
        return int(option)
    patch_embed = getattr(model, "patch_embed", None)
    fixed = getattr(patch_embed, "img_size", None)
    if fixed is not None:
        return int(fixed[0])
    return int(data_config["input_size"][-1])


class TimmSpace(FeatureSpace):
    def attributes(self) -> dict[str, Any]:
        net: TimmFeatures = self.network
        return {**super().attributes(), "model": self.spec.options["model"],
                "input_size": net.input_size, "interpolation": f"{net.interpolation}, antialias",
                "mean": list(net.mean_values), "std": list(net.std_values),
                "pooling": net.pooling, "crop": "none (whole image resized)",
                "weights_file": self.spec.weights or ""}


def wrap_model(model: nn.Module, pooling: str, input_size: int | None = None) -> TimmFeatures:
    """Wrap a timm model with the preprocessing of its pretrained config and a pooling."""
    from timm.data import resolve_model_data_config

    data_config = resolve_model_data_config(model)
    return TimmFeatures(model, pooling, _input_size(model, input_size, data_config),
                        tuple(data_config["mean"]), tuple(data_config["std"]),
                        _interpolation(data_config["interpolation"]))


def _weights_file(spec: SpaceSpec) -> str:
    import timm

    sha256 = spec.options.get("weights_sha256")
    if spec.weights:
        return str(check_weights_file(spec.name, spec.weights, sha256))
    name = spec.options["model"]
    cfg = timm.models.get_pretrained_cfg(name)
    repo_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo_id:
        raise FileNotFoundError(
            f"space '{spec.name}': timm has no Hugging Face weights for model {name!r}; set "
            f"spaces.{spec.name}.weights to a weights file (use a name with a pretrained tag, "
            f"such as 'vit_large_patch14_dinov2.lvd142m', to load from the hub)"
        )
    filename = getattr(cfg, "hf_hub_filename", None) or "model.safetensors"
    path = hub_weights(spec.name, repo_id, filename)
    if sha256:
        check_weights_file(spec.name, path, sha256)
    return str(path)


@register_family("timm")
def build_timm(spec: SpaceSpec) -> TimmSpace:
    _check_options(spec, KNOWN_OPTIONS)
    if not spec.options.get("model"):
        raise ValueError(f"space '{spec.name}': set spaces.{spec.name}.options.model to a timm "
                         f"model name, such as 'vit_large_patch14_dinov2.lvd142m'")
    weights = _weights_file(spec)
    input_option = spec.options.get("input_size")
    try:
        model = create_model(spec.options["model"], weights,
                             dict(spec.options.get("model_kwargs") or {}), input_option)
    except RuntimeError as err:
        raise ValueError(f"space '{spec.name}': weights {weights} do not fit timm model "
                         f"{spec.options['model']!r} with model_kwargs "
                         f"{spec.options.get('model_kwargs') or {}}: {err}") from err
    pooling = spec.options.get("pooling", "cls")
    _check_pooling(spec, model, pooling)
    network = wrap_model(model, pooling, input_option)
    resolved = SpaceSpec(spec.name, spec.family, dict(spec.options), weights, spec.trainable)
    head_dim = int(getattr(model, "head_hidden_size", model.num_features))
    uses_head = pooling == "cls" or not hasattr(model, "num_prefix_tokens")
    return TimmSpace(resolved, network, head_dim if uses_head else int(model.num_features))
