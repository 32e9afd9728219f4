"""An in-memory labelled image set: the common currency of the data loaders."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ImageSet"]


@dataclass(frozen=True)
class ImageSet:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64, with class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"images must be (N, C, H, W) matching labels, got {self.images.shape}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])
