"""The feature transformer F: prototype space (K) → generator latent space (W)."""

from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

__all__ = ["FeatureTransformer"]


class FeatureTransformer(nn.Module, PyTorchModelHubMixin):
    """An MLP ``K → hidden → … → W`` with LayerNorm between layers.

    LayerNorm normalises each row on its own, so F works for any batch size, one included (the reference
    used BatchNorm1d, which raises on a batch of one in training mode and ties outputs to batch
    composition). Saved HF-style: ``save_pretrained(dir)`` writes ``config.json`` + ``model.safetensors``.

    Parameters
    ----------
    in_dim
        K, the prototype dimension.
    out_dim
        W, the generator's latent dimension.
    hidden_dim
        Width of the hidden layers.
    num_layers
        Number of linear layers (≥ 1; 1 is a plain linear map).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU()]
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim))
        self.mlp = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
