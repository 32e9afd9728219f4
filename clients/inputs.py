"""Pixel conventions shared by the data sets, the clients and the generated images.

Data sets hold images as float in [0, 1], ``(N, C, H, W)``. Models see ``(x - 0.5) / 0.5`` (PFLlib's
``Normalize(0.5, 0.5)``). Generated RGB images are brought to a client's input space with
`adapt_images`: channel conversion, antialiased resize, the same normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["normalize_pixels", "adapt_images"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")


def normalize_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels → the models' input range [-1, 1]."""
    return (x - 0.5) / 0.5


def adapt_images(images: torch.Tensor, *, num_channels: int, image_size: int) -> torch.Tensor:
    """Bring ``(m, c, h, w)`` images in [0, 1] to a client's ``(m, num_channels, image_size, image_size)``
    input space, normalised like its data."""
    x = images.float()
    if x.shape[1] != num_channels:
        if num_channels == 1 and x.shape[1] == 3:
            x = (x * torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, num_channels, -1, -1)
        else:
            raise ValueError(f"cannot convert {x.shape[1]}-channel images to {num_channels} channels")
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )
    return normalize_pixels(x.clamp(0.0, 1.0))
