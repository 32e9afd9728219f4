"""A small synthetic image set for tests and offline demos: each class is a fixed random smooth pattern,
samples are that pattern shifted, scaled in contrast and noised. Models learn it in a few steps."""

from __future__ import annotations

import numpy as np

from ktl.data.images import ImageSet

__all__ = ["make_synthetic"]


def make_synthetic(
    *,
    num_classes: int = 10,
    samples_per_class: int = 100,
    image_size: int = 28,
    num_channels: int = 1,
    seed: int = 0,
) -> ImageSet:
    rng = np.random.default_rng(seed)
    coarse = rng.random((num_classes, num_channels, 7, 7))
    reps = -(-image_size // 7)
    patterns = np.kron(coarse, np.ones((1, 1, reps, reps)))[..., :image_size, :image_size]
    n = num_classes * samples_per_class
    labels = np.repeat(np.arange(num_classes), samples_per_class)
    shifts = rng.integers(-2, 3, size=(n, 2))
    images = np.empty((n, num_channels, image_size, image_size), dtype=np.float64)
    for i, (label, (dy, dx)) in enumerate(zip(labels, shifts, strict=True)):
        images[i] = np.roll(patterns[label], (int(dy), int(dx)), axis=(-2, -1))
    images = images * rng.uniform(0.6, 1.0, size=(n, 1, 1, 1)) + rng.normal(0, 0.08, size=images.shape)
    order = rng.permutation(n)
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return ImageSet(
        pixels[order], labels[order], [f"class {c}" for c in range(num_classes)], source="synthetic"
    )
