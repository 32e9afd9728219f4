"""Heterogeneous client backbones, built from transformers configs and kept in a registry.

Every backbone maps ``(B, C, H, W)`` pixels (normalised, see `ktl.clients.inputs`) to a ``(B, D)`` feature
vector and reports ``feature_dim`` = D. All are transformers ``PreTrainedModel``s, so each saves with
``save_pretrained``. The default sizes are chosen for 28×28 and 32×32 inputs on a CPU (see
docs/architecture.md for the measured cost per sample).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextModel,
    MobileNetV2Config,
    MobileNetV2Model,
    PretrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTModel,
)

__all__ = [
    "Backbone",
    "BackboneInfo",
    "register_backbone",
    "build_backbone",
    "available_backbones",
    "BACKBONES",
]


class Backbone(nn.Module):
    """A transformers model plus the rule that turns its output into one feature vector per image."""

    def __init__(
        self, model: PreTrainedModel, pool: Callable[[object], torch.Tensor], feature_dim: int
    ) -> None:
        super().__init__()
        self.model = model
        self._pool = pool
        self.feature_dim = feature_dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._pool(self.model(pixel_values=pixel_values)).flatten(1)


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    build: Callable[[int, int], Backbone]  # (num_channels, image_size) -> Backbone
    summary: str


BACKBONES: dict[str, BackboneInfo] = {}


def register_backbone(
    name: str, summary: str
) -> Callable[[Callable[[int, int], Backbone]], Callable[[int, int], Backbone]]:
    def wrap(build: Callable[[int, int], Backbone]) -> Callable[[int, int], Backbone]:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is registered twice")
        BACKBONES[name] = BackboneInfo(name, build, summary)
        return build

    return wrap


def available_backbones() -> list[str]:
    return sorted(BACKBONES)


def build_backbone(name: str, *, num_channels: int, image_size: int) -> Backbone:
    """Build the registered backbone ``name`` for ``num_channels × image_size × image_size`` inputs."""
    info = BACKBONES.get(name)
    if info is None:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(available_backbones())}")
    return info.build(num_channels, image_size)


# --- a plain 4-layer CNN as a transformers model -------------------------------------------------------


class Cnn4Config(PretrainedConfig):
    """HtFLlib's FedAvgCNN: conv5-pool-conv5-pool-fc, the head being the 4th layer."""

    model_type = "ktl-cnn4"

    def __init__(
        self,
        num_channels: int = 1,
        image_size: int = 28,
        channels: tuple[int, int] = (32, 64),
        hidden_size: int = 512,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.image_size = image_size
        self.channels = list(channels)
        self.hidden_size = hidden_size


class Cnn4Model(PreTrainedModel):
    config_class = Cnn4Config
    base_model_prefix = "cnn4"
    main_input_name = "pixel_values"

    def __init__(self, config: Cnn4Config) -> None:
        super().__init__(config)
        c1, c2 = config.channels
        side = ((config.image_size - 4) // 2 - 4) // 2  # two valid 5×5 convs, each followed by a 2×2 pool
        self.features = nn.Sequential(
            nn.Conv2d(config.num_channels, c1, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * side * side, config.hidden_size),
            nn.ReLU(inplace=True),
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:  # keep PyTorch's default initialisation
        return None

    def forward(self, pixel_values: torch.Tensor, **_: object) -> torch.Tensor:
        return self.features(pixel_values)


def _identity(out: object) -> torch.Tensor:
    assert isinstance(out, torch.Tensor)
    return out


def _pooler(out: object) -> torch.Tensor:
    return out.pooler_output  # type: ignore[attr-defined]


def _cls_token(out: object) -> torch.Tensor:
    return out.last_hidden_state[:, 0]  # type: ignore[attr-defined]


@register_backbone("cnn4", "2 conv + 1 fc (HtFLlib FedAvgCNN), 512-d features")
def _cnn4(num_channels: int, image_size: int) -> Backbone:
    model = Cnn4Model(Cnn4Config(num_channels=num_channels, image_size=image_size))
    return Backbone(model, _identity, model.config.hidden_size)


def _resnet(num_channels: int, depths: list[int], hidden: list[int]) -> Backbone:
    cfg = ResNetConfig(
        num_channels=num_channels,
        embedding_size=hidden[0],
        hidden_sizes=hidden,
        depths=depths,
        layer_type="basic",
    )
    return Backbone(ResNetModel(cfg), _pooler, hidden[-1])


@register_backbone("resnet-s", "ResNet, basic blocks, depths 1-1-1, widths 32-64-128")
def _resnet_s(num_channels: int, image_size: int) -> Backbone:
    return _resnet(num_channels, [1, 1, 1], [32, 64, 128])


@register_backbone("resnet-m", "ResNet, basic blocks, depths 2-2-2, widths 32-64-128")
def _resnet_m(num_channels: int, image_size: int) -> Backbone:
    return _resnet(num_channels, [2, 2, 2], [32, 64, 128])


@register_backbone("resnet18", "ResNet-18 (depths 2-2-2-2, widths 64-512), for the GPU preset")
def _resnet18(num_channels: int, image_size: int) -> Backbone:
    return _resnet(num_channels, [2, 2, 2, 2], [64, 128, 256, 512])


@register_backbone("mobilenetv2", "MobileNetV2, depth multiplier 0.35, 1280-d features")
def _mobilenetv2(num_channels: int, image_size: int) -> Backbone:
    cfg = MobileNetV2Config(num_channels=num_channels, image_size=image_size, depth_multiplier=0.35)
    return Backbone(MobileNetV2Model(cfg), _pooler, 1280)


@register_backbone("vit-small", "ViT, 4×4 patches of 7px (28px) or 8px (32px), 4 layers, width 128, 4 heads")
def _vit_small(num_channels: int, image_size: int) -> Backbone:
    patch = max(1, image_size // 4)  # a 4×4 grid of patches
    cfg = ViTConfig(
        image_size=image_size,
        patch_size=patch,
        num_channels=num_channels,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
    )
    return Backbone(ViTModel(cfg, add_pooling_layer=False), _cls_token, 128)


@register_backbone("convnext", "ConvNeXt, patch 2, depths 1-1-1, widths 32-64-128")
def _convnext(num_channels: int, image_size: int) -> Backbone:
    cfg = ConvNextConfig(
        num_channels=num_channels, patch_size=2, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], num_stages=3
    )
    return Backbone(ConvNextModel(cfg), _pooler, 128)
