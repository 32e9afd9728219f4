"""Fashion-MNIST from IDX ``.gz`` files (Debian's ``dataset-fashion-mnist`` or any folder)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from ktl.data.images import ImageSet
from ktl.errors import DataError

__all__ = ["CLASS_NAMES", "DEBIAN_DIR", "ENV_VAR", "find_fashion_mnist", "load_fashion_mnist", "read_idx"]

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "KTL_DATA_DIR"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file")
    dtype = _IDX_DTYPES.get(data[2])
    if dtype is None:
        raise DataError(f"{path}: unknown IDX type code {data[2]:#x}")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def _file(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def find_fashion_mnist(path: Path | None = None) -> Path:
    """The folder to read: ``path`` if given, else ``$KTL_DATA_DIR``, else Debian's package folder.

    A folder qualifies if it (or its ``fashion-mnist`` subfolder) holds the four IDX files.
    """
    if path is not None:
        candidates, origin = [Path(path).expanduser()], "--data.path"
    elif os.environ.get(ENV_VAR):
        candidates, origin = [Path(os.environ[ENV_VAR]).expanduser()], f"${ENV_VAR}"
    else:
        candidates, origin = [DEBIAN_DIR], "the default location"
    for root in candidates:
        for folder in (root, root / "fashion-mnist"):
            if all(_file(folder, stem) for pair in _FILES.values() for stem in pair):
                return folder
    raise DataError(
        f"Fashion-MNIST not found in {candidates[0]} ({origin}); install Debian's package "
        f"(apt-get install dataset-fashion-mnist) or pass --data.path DIR / set {ENV_VAR} to a folder "
        "with the four IDX .gz files"
    )


def load_fashion_mnist(path: Path | None = None) -> ImageSet:
    """All 70 000 images (train + t10k; partitions re-split them per client, as PFLlib does)."""
    folder = find_fashion_mnist(path)
    images, labels = [], []
    for img_stem, lbl_stem in _FILES.values():
        img = read_idx(_file(folder, img_stem))  # type: ignore[arg-type]
        lbl = read_idx(_file(folder, lbl_stem))  # type: ignore[arg-type]
        if img.ndim != 3 or lbl.shape != (img.shape[0],):
            raise DataError(f"{folder}: images {img.shape} and labels {lbl.shape} do not match")
        images.append(img[:, None])
        labels.append(lbl.astype(np.int64))
    return ImageSet(
        np.concatenate(images), np.concatenate(labels), list(CLASS_NAMES), source=f"Fashion-MNIST ({folder})"
    )
