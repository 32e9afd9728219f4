"""PNG grids of images with labels."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ktl.records import Pairs

__all__ = ["image_grid", "pairs_grid_png"]


def image_grid(
    images: torch.Tensor, labels: Sequence[str] | None = None, *, columns: int = 10, cell: int = 64
) -> Image.Image:
    """Tile ``(m, C, H, W)`` images (uint8, or float in [0, 1]) into one RGB picture, a label under each.

    Each image is upscaled with nearest-neighbour to ``cell`` pixels so small generations stay legible.
    """
    if images.dtype != torch.uint8:
        images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    images = images.cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    m = images.shape[0]
    columns = max(1, min(columns, m))
    rows = max(1, -(-m // columns))
    label_h = 14 if labels else 0
    pad = 2
    canvas = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i in range(m):
        r, c = divmod(i, columns)
        x0, y0 = pad + c * (cell + pad), pad + r * (cell + label_h + pad)
        tile = Image.fromarray(np.ascontiguousarray(images[i].permute(1, 2, 0).numpy()), "RGB")
        canvas.paste(tile.resize((cell, cell), Image.Resampling.NEAREST), (x0, y0))
        if labels:
            draw.text((x0 + 1, y0 + cell + 1), str(labels[i])[: cell // 6], fill="black", font=font)
    return canvas


def pairs_grid_png(pairs: Pairs, class_names: Sequence[str] | None, pairs_per_class: int) -> bytes:
    """A round's pairs as a labelled PNG grid (run folders and the server's ``pairs.png``): one class per
    row when classes have several pairs, else rows of 10; labels are class names, or ``class <c>``."""
    ids = pairs.class_ids.tolist()
    labels = [class_names[c] if class_names else f"class {c}" for c in ids]
    buffer = io.BytesIO()
    image_grid(pairs.images, labels, columns=pairs_per_class if pairs_per_class > 1 else 10).save(
        buffer, "PNG"
    )
    return buffer.getvalue()
