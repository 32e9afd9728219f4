"""A plain ``torch.nn.Module`` CNN registered as the backbone ``my-cnn`` (docs/extending.md).

Use it as a local plugin file:

    ktl --plugin docs/examples/custom_cnn.py simulate --preset smoke --models my-cnn,cnn4

ktl calls ``MyCnn(num_channels, image_size)`` once per client, then ``model(x)`` on normalised pixels
``(B, C, S, S)``; ``forward`` returns features ``(B, D)``. D is not declared here, so ktl measures it with
one forward pass of a zero batch (declare it with ``register_backbone(..., feature_dim=D)`` or a
``feature_dim`` attribute to skip that pass). The module needs nothing from transformers: the client's
head, projector, training, prototypes and saved state work as for the built-in backbones.
"""

from __future__ import annotations

import torch
from torch import nn

from ktl.clients.backbones import register_backbone


@register_backbone("my-cnn", "docs/examples/custom_cnn.py: 3 conv blocks + global average pool, 64-d")
class MyCnn(nn.Module):
    """Three 3×3 conv blocks (BatchNorm, ReLU, 2×2 max-pool after the first two) and a global average."""

    def __init__(self, num_channels: int, image_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(num_channels, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),  # any image_size: (B, 64, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(1)  # (B, 64)
