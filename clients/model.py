"""A client's model: backbone → head to K dims (against the fixed ETF), plus the distillation projector and,
for the methods that train their own classifier instead of the fixed ETF, a linear classifier on the head."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ktl.clients.backbones import Backbone, build_backbone

__all__ = ["ClientModel", "seeded_linear"]


class ClientModel(nn.Module):
    """Feature extractor, a linear head to K = C dims, and a projector to the generator's latent space.

    The projector belongs to the client and keeps training across rounds (the reference reloaded it from
    the server every round, throwing its training away). It is created the first time a latent dimension
    is known and replaced only if the federation's generator changes its latent size.

    Parameters
    ----------
    backbone
        Maps pixels to ``(B, D)`` features.
    proto_dim
        K, the head's output size (FedKTL uses K = C).
    latent_dim
        W, if known at construction.
    """

    def __init__(self, backbone: Backbone, *, proto_dim: int, latent_dim: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, proto_dim)
        self.projector: nn.Linear | None = None
        # K → C logits for the methods with a trainable classifier (LG-FedAvg, FedGH, FedGen, FML, FedKD):
        # None while the fixed ETF classifies (FedKTL and the prototype baselines)
        self.classifier: nn.Linear | None = None
        # FedMRL: ``(images, head outputs) → the representation the classifier reads`` (its fused Matryoshka
        # representation) in place of the head outputs; None: the head outputs themselves. A plain callable,
        # not a submodule: what it trains belongs to the method that sets it, and so does its state.
        self.fusion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        if latent_dim is not None:
            self.ensure_projector(latent_dim)

    @classmethod
    def build(cls, name: str, *, num_channels: int, image_size: int, proto_dim: int) -> ClientModel:
        return cls(
            build_backbone(name, num_channels=num_channels, image_size=image_size), proto_dim=proto_dim
        )

    def ensure_projector(self, latent_dim: int, generator: torch.Generator | None = None) -> nn.Linear:
        """Create the projector on first use (or if W changed), initialised like ``nn.Linear`` but from
        ``generator``: the global RNG is neither used nor advanced, so the result does not depend on what
        else the process did before (another client, a server thread)."""
        if self.projector is None or self.projector.out_features != latent_dim:
            layer = seeded_linear(self.backbone.feature_dim, latent_dim, generator)
            self.projector = layer.to(self.head.weight.device)
        return self.projector

    def ensure_classifier(self, num_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
        """Create the trainable classifier ``K → num_classes`` on first use, initialised like ``nn.Linear``
        but from ``generator`` (the global RNG is neither used nor advanced)."""
        if self.classifier is None or self.classifier.out_features != num_classes:
            self.classifier = seeded_linear(self.head.out_features, num_classes, generator).to(
                self.head.weight.device
            )
        return self.classifier

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Head outputs ``(B, K)`` (through `fusion` when a method set one)."""
        out = self.head(self.backbone(x))
        return out if self.fusion is None else self.fusion(x, out)


def seeded_linear(fan_in: int, fan_out: int, generator: torch.Generator | None) -> nn.Linear:
    """``nn.Linear(fan_in, fan_out)`` with ``nn.Linear``'s initialisation drawn from ``generator``."""
    layer = nn.utils.skip_init(nn.Linear, fan_in, fan_out)
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer
