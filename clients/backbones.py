"""Heterogeneous client backbones, kept in a registry: transformers models, or any plain ``nn.Module``.

Every backbone maps ``(B, C, H, W)`` pixels (normalised, see `ktl.clients.inputs`) to a ``(B, D)`` feature
vector and reports ``feature_dim`` = D. The built-in ones are transformers ``PreTrainedModel``s (called
with ``pixel_values=``), so each saves with ``save_pretrained``. The default sizes are chosen for 28×28 and
32×32 inputs on a CPU (see docs/architecture.md for the measured cost per sample).

A registered builder ``build(num_channels, image_size)`` returns either a `Backbone` or a plain
``torch.nn.Module`` whose ``forward(x)`` takes the pixels positionally and returns features ``(B, D)``;
an output of more dimensions ``(B, D1, D2, …)`` is flattened to ``(B, D1·D2·…)`` (pool inside the module
if you want a pooled vector). A plain module is wrapped in a `ModuleBackbone`; its D is, in this order,
``register_backbone(..., feature_dim=D)``, the module's own ``feature_dim`` attribute, or the size of its
output for a zero batch of the declared input shape, measured once in eval mode without gradients (so
running statistics and the RNG are untouched). See docs/extending.md.
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

from ktl.errors import ConfigError

__all__ = [
    "Backbone",
    "BackboneBuild",
    "BackboneInfo",
    "ModuleBackbone",
    "register_backbone",
    "build_backbone",
    "available_backbones",
    "infer_feature_dim",
    "wrap_module",
    "BACKBONES",
    "MODEL_GROUPS",
    "ModelGroup",
    "expand_models",
    "register_model_group",
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


def _as_tensor(out: object) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"a backbone module must return a tensor of features, got {type(out).__name__}")
    return out


class ModuleBackbone(Backbone):
    """A plain ``nn.Module`` as a backbone: called as ``module(x)``, its output flattened to ``(B, D)``.

    The module is kept as ``.model``, like a transformers backbone, so a `ClientModel`'s state dict has the
    same shape of names whichever kind it holds.
    """

    def __init__(self, module: nn.Module, feature_dim: int) -> None:
        super().__init__(module, _as_tensor, feature_dim)  # type: ignore[arg-type]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _as_tensor(self.model(pixel_values)).flatten(1)


# (num_channels, image_size) -> a Backbone, or a plain nn.Module (wrapped by `wrap_module`)
BackboneBuild = Callable[[int, int], nn.Module]


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    build: BackboneBuild
    summary: str
    feature_dim: int | None = None  # a plain module's D, when declared at registration
    large: bool = False  # sized for the GPU preset (tests build it only with --runslow)


BACKBONES: dict[str, BackboneInfo] = {}


def register_backbone(
    name: str, summary: str, *, feature_dim: int | None = None, large: bool = False
) -> Callable[[BackboneBuild], BackboneBuild]:
    """Decorator: make ``build(num_channels, image_size)`` — a function or an ``nn.Module`` class — the
    backbone ``name``. ``feature_dim`` declares a plain module's D (else it is the module's
    ``feature_dim`` attribute, else measured; see the module docstring); ``large`` marks one sized for a
    GPU."""
    if feature_dim is not None and feature_dim < 1:
        raise ValueError(f"backbone {name!r}: feature_dim must be positive, got {feature_dim}")

    def wrap(build: BackboneBuild) -> BackboneBuild:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is registered twice")
        BACKBONES[name] = BackboneInfo(name, build, summary, feature_dim, large)
        return build

    return wrap


def available_backbones() -> list[str]:
    return sorted(BACKBONES)


@dataclass(frozen=True)
class ModelGroup:
    """A named family of backbones that one ``--models NAME`` selects (HtFLlib's model groups)."""

    name: str
    members: tuple[str, ...]
    summary: str


MODEL_GROUPS: dict[str, ModelGroup] = {}


def register_model_group(name: str, members: list[str] | tuple[str, ...], summary: str) -> ModelGroup:
    """Make ``--models name`` stand for ``members`` (registered backbones, checked when expanded)."""
    if name in MODEL_GROUPS or name in BACKBONES:
        raise ValueError(f"model group {name!r} is registered twice or shadows a backbone")
    if not members:
        raise ValueError(f"model group {name!r} has no members")
    group = ModelGroup(name, tuple(members), summary)
    MODEL_GROUPS[name] = group
    return group


def expand_models(models: list[str]) -> list[str]:
    """``models`` with every group name replaced by its members, in order; a name that is neither a
    backbone nor a group is a ``ValueError`` listing both."""
    out: list[str] = []
    for name in models:
        group = MODEL_GROUPS.get(name)
        out.extend(group.members if group is not None else [name])
    unknown = [m for m in out if m not in BACKBONES]
    if unknown:
        raise ValueError(
            f"unknown model {unknown[0]!r}; available: {', '.join(available_backbones())}; "
            f"groups: {', '.join(sorted(MODEL_GROUPS))}"
        )
    return out


def build_backbone(name: str, *, num_channels: int, image_size: int) -> Backbone:
    """Build the registered backbone ``name`` for ``num_channels × image_size × image_size`` inputs."""
    info = BACKBONES.get(name)
    if info is None:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(available_backbones())}")
    built = info.build(num_channels, image_size)
    if isinstance(built, Backbone):
        return built
    return wrap_module(
        built, num_channels=num_channels, image_size=image_size, feature_dim=info.feature_dim, name=name
    )


def infer_feature_dim(module: nn.Module, *, num_channels: int, image_size: int, name: str = "") -> int:
    """D of ``module``: the per-sample size of its output for a zero batch ``(2, C, S, S)``, in eval mode
    without gradients (the module's training flag is restored)."""
    label = f"backbone {name!r}" if name else "backbone"
    shape = (2, num_channels, image_size, image_size)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = _as_tensor(module(torch.zeros(shape)))
    except Exception as exc:
        raise ConfigError(f"{label} failed on a zero batch of shape {shape}: {exc}") from exc
    finally:
        module.train(was_training)
    if out.ndim < 2 or out.shape[0] != shape[0]:
        raise ConfigError(
            f"{label} must return (B, D) features; for input {shape} it gave {tuple(out.shape)}"
        )
    return int(out[0].numel())


def wrap_module(
    module: nn.Module,
    *,
    num_channels: int,
    image_size: int,
    feature_dim: int | None = None,
    name: str = "",
) -> ModuleBackbone:
    """A plain module as a `Backbone`; D is ``feature_dim``, else ``module.feature_dim``, else measured."""
    label = f"backbone {name!r}" if name else "backbone"
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{label}: the builder returned {type(module).__name__}, not a torch.nn.Module")
    dim = feature_dim if feature_dim is not None else getattr(module, "feature_dim", None)
    if dim is None:
        dim = infer_feature_dim(module, num_channels=num_channels, image_size=image_size, name=name)
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ConfigError(f"{label}: feature_dim must be a positive int, got {dim!r}")
    return ModuleBackbone(module, dim)


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


@register_backbone("resnet10", "ResNet-10 (depths 1-1-1-1, widths 64-512), HtFLlib's")
def _resnet10(num_channels: int, image_size: int) -> Backbone:
    return _resnet(num_channels, [1, 1, 1, 1], [64, 128, 256, 512])


@register_backbone("resnet34", "ResNet-34 (depths 3-4-6-3, widths 64-512)", large=True)
def _resnet34(num_channels: int, image_size: int) -> Backbone:
    return _resnet(num_channels, [3, 4, 6, 3], [64, 128, 256, 512])


def _bottleneck_resnet(num_channels: int, depths: list[int]) -> Backbone:
    cfg = ResNetConfig(
        num_channels=num_channels,
        embedding_size=64,
        hidden_sizes=[256, 512, 1024, 2048],
        depths=depths,
        layer_type="bottleneck",
    )
    return Backbone(ResNetModel(cfg), _pooler, 2048)


@register_backbone("resnet50", "ResNet-50 (bottleneck, depths 3-4-6-3), 2048-d features", large=True)
def _resnet50(num_channels: int, image_size: int) -> Backbone:
    return _bottleneck_resnet(num_channels, [3, 4, 6, 3])


@register_backbone("resnet101", "ResNet-101 (bottleneck, depths 3-4-23-3), 2048-d features", large=True)
def _resnet101(num_channels: int, image_size: int) -> Backbone:
    return _bottleneck_resnet(num_channels, [3, 4, 23, 3])


@register_backbone("resnet152", "ResNet-152 (bottleneck, depths 3-8-36-3), 2048-d features", large=True)
def _resnet152(num_channels: int, image_size: int) -> Backbone:
    return _bottleneck_resnet(num_channels, [3, 8, 36, 3])


@register_backbone("mobilenetv2", "MobileNetV2, depth multiplier 0.35, 1280-d features")
def _mobilenetv2(num_channels: int, image_size: int) -> Backbone:
    cfg = MobileNetV2Config(num_channels=num_channels, image_size=image_size, depth_multiplier=0.35)
    return Backbone(MobileNetV2Model(cfg), _pooler, 1280)


@register_backbone("mobilenetv2-1.0", "MobileNetV2 at full width (depth multiplier 1), 1280-d", large=True)
def _mobilenetv2_full(num_channels: int, image_size: int) -> Backbone:
    cfg = MobileNetV2Config(num_channels=num_channels, image_size=image_size, depth_multiplier=1.0)
    return Backbone(MobileNetV2Model(cfg), _pooler, 1280)


# --- GoogLeNet (Inception v1) as a plain module: transformers has no config for it -------------------


def _conv(cin: int, cout: int, kernel: int, **kw: Any) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, bias=False, **kw), nn.BatchNorm2d(cout, eps=0.001), nn.ReLU(inplace=True)
    )


class _Inception(nn.Module):
    """Four parallel branches — 1×1; 1×1→3×3; 1×1→3×3 (torchvision's stand-in for 5×5); pool→1×1 —
    concatenated."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int) -> None:
        super().__init__()
        self.b1 = _conv(cin, c1, 1)
        self.b2 = nn.Sequential(_conv(cin, c3r, 1), _conv(c3r, c3, 3, padding=1))
        self.b3 = nn.Sequential(_conv(cin, c5r, 1), _conv(c5r, c5, 3, padding=1))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), _conv(cin, pool, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class GoogLeNet(nn.Module):
    """GoogLeNet (Szegedy et al., 2015) without its auxiliary classifiers, as torchvision builds it (which
    HtFLlib uses): a 7×7/2 stem, nine Inception blocks, global average pooling to 1024-d features."""

    feature_dim = 1024

    def __init__(self, num_channels: int = 3) -> None:
        super().__init__()

        def pool() -> nn.MaxPool2d:
            return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)

        self.stem = nn.Sequential(
            _conv(num_channels, 64, 7, stride=2, padding=3),
            pool(),
            _conv(64, 64, 1),
            _conv(64, 192, 3, padding=1),
            pool(),
        )
        self.blocks = nn.Sequential(
            _Inception(192, 64, 96, 128, 16, 32, 32),
            _Inception(256, 128, 128, 192, 32, 96, 64),
            pool(),
            _Inception(480, 192, 96, 208, 16, 48, 64),
            _Inception(512, 160, 112, 224, 24, 64, 64),
            _Inception(512, 128, 128, 256, 24, 64, 64),
            _Inception(512, 112, 144, 288, 32, 64, 64),
            _Inception(528, 256, 160, 320, 32, 128, 128),
            nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
            _Inception(832, 256, 160, 320, 32, 128, 128),
            _Inception(832, 384, 192, 384, 48, 128, 128),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x))).flatten(1)


@register_backbone("googlenet", "GoogLeNet (Inception v1, no auxiliary heads), 1024-d features", large=True)
def _googlenet(num_channels: int, image_size: int) -> nn.Module:
    return GoogLeNet(num_channels)


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


# --- HtFLlib's model families (its papers' heterogeneous-model settings) -------------------------------

register_model_group("htfe2", ["cnn4", "resnet18"], "HtFE2: a 4-layer CNN and ResNet-18")
register_model_group("htfe3", ["resnet10", "resnet18", "resnet34"], "HtFE3: ResNet-10, -18 and -34")
register_model_group(
    "htfe8",
    ["cnn4", "googlenet", "mobilenetv2-1.0", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
    "HtFE8: a 4-layer CNN, GoogLeNet, MobileNetV2 and ResNet-18/34/50/101/152 (for a GPU)",
)
