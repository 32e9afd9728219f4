"""The ``image-folder`` data set: PNG files sorted into one subfolder per class.

Layout: ``ROOT/<class name>/*.png``. The class names are the subfolder names, sorted (hidden folders,
starting with ``.``, are skipped); a class's label is its index in that order. Files are read with Pillow
in name order; other files are ignored. Every class folder must hold at least one PNG.

Channels: 1 when every image is 8-bit grayscale (Pillow modes ``1``, ``L``, ``LA``), else 3 (every image converted to RGB; alpha is dropped). Size: every image is resized (bilinear) to
``size × size`` — ``data.image_size`` when set, else the images' own side when they all share one square
size, else 32. Non-square images are stretched, not cropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ktl.data.images import ImageSet
from ktl.errors import DataError

__all__ = ["DEFAULT_IMAGE_SIZE", "load_image_folder"]

DEFAULT_IMAGE_SIZE = 32
_GRAY_MODES = frozenset({"1", "L", "LA"})


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(
            f"image-folder: {root} is not a folder (it needs one subfolder of PNG files per class)"
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(
            f"image-folder: {root} has no class subfolders (one subfolder of PNG files per class)"
        )
    return folders


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    """The file's Pillow mode and (width, height), from its header alone."""
    try:
        with Image.open(path) as image:
            return image.mode, image.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"image-folder: cannot read {path}: {exc}") from None


def _pixels(path: Path, mode: str, side: int) -> np.ndarray:
    """The file as uint8 ``(C, side, side)``."""
    try:
        with Image.open(path) as image:
            converted = image.convert(mode)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"image-folder: cannot read {path}: {exc}") from None
    if converted.size != (side, side):
        converted = converted.resize((side, side), Image.Resampling.BILINEAR)
    array = np.asarray(converted, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_image_folder(root: Path, image_size: int | None = None) -> ImageSet:
    """Read ``root`` (see the module docstring) into an `ImageSet` of uint8 ``(N, C, S, S)`` images."""
    root = Path(root).expanduser()
    folders = _class_folders(root)
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        pngs = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")
        if not pngs:
            raise DataError(f"image-folder: class folder {folder} holds no .png files")
        files.extend(pngs)
        labels.extend([label] * len(pngs))
    headers = [_header(f) for f in files]
    gray = all(mode in _GRAY_MODES for mode, _ in headers)
    if image_size is None:
        (w, h), *rest = {size for _, size in headers}
        image_size = w if not rest and w == h else DEFAULT_IMAGE_SIZE
    pixels = np.stack([_pixels(f, "L" if gray else "RGB", image_size) for f in files])
    return ImageSet(
        pixels,
        np.asarray(labels, dtype=np.int64),
        [folder.name for folder in folders],
        source=f"image-folder:{root}",
    )
