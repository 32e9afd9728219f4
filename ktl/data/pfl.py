"""Per-client ``.npz`` folders as PFLlib writes them, so users can bring their existing partitions.

Layout: ``ROOT/train/{i}.npz`` and ``ROOT/test/{i}.npz`` for clients ``i = 0 … N-1`` (an optional
``ROOT/config.json`` may give ``num_classes`` and ``class_names``). Each file holds either arrays ``x`` and ``y`` directly, or
PFLlib's single ``data`` entry: a pickled dict ``{'x': …, 'y': …}``. That pickle is read with an
unpickler that admits numpy array reconstruction only — never arbitrary classes — so a crafted file
cannot run code. Images may be ``(n, H, W)`` or ``(n, C, H, W)``; uint8 in [0, 255], float in [0, 1],
or float in [-1, 1] (PFLlib's ``Normalize(0.5, 0.5)``).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npformat

from ktl.data.images import ImageSet
from ktl.errors import DataError

__all__ = ["class_names_from", "load_pfl_folder", "read_client_images", "read_client_npz", "to_uint8_nchw"]

_ALLOWED_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: only numpy arrays are read from .npz files")


def _read_object_member(zf: zipfile.ZipFile, member: str) -> Any:
    with zf.open(member) as raw:
        version = npformat.read_magic(raw)
        reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        _, _, dtype = reader(raw)
        if not dtype.hasobject:
            raw.seek(0)
            return npformat.read_array(raw, allow_pickle=False)
        return _NumpyOnlyUnpickler(raw).load()


def read_client_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of one client file; see the module docstring for the accepted layouts."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if {"x", "y"} <= keys:
                return np.asarray(npz["x"]), np.asarray(npz["y"])
        if keys != {"data"}:
            raise DataError(f"{path}: expected arrays 'x' and 'y' or PFLlib's 'data', found {sorted(keys)}")
        with zipfile.ZipFile(path) as zf:
            obj = _read_object_member(zf, "data.npy")
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    item = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0 else obj
    if not isinstance(item, dict) or not {"x", "y"} <= set(item):
        raise DataError(f"{path}: PFLlib 'data' must be a dict with 'x' and 'y'")
    return np.asarray(item["x"]), np.asarray(item["y"])


def read_client_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One client file as uint8 ``(n, C, H, W)`` images and int64 labels, labels matching images."""
    x, y = read_client_npz(path)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{path}: labels {y.shape} do not match images {x.shape}")
    return to_uint8_nchw(x, path), y.astype(np.int64)


def to_uint8_nchw(x: np.ndarray, path: Path) -> np.ndarray:
    """Images of any accepted layout and range (module docstring) → uint8 ``(n, C, H, W)``."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{path}: images must be (n, H, W) or (n, C, H, W), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    x = x.astype(np.float32)
    if x.size and x.min() < 0:  # PFLlib's Normalize(0.5, 0.5): [-1, 1] → [0, 1]
        x = x * 0.5 + 0.5
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def class_names_from(root: Path, seen: int) -> list[str]:
    """Class names for a PFLlib-style folder: ``config.json``'s ``class_names`` (a list) when it has them,
    else ``class <c>`` for as many classes as its ``num_classes`` says or the labels ``seen`` need."""
    config = Path(root) / "config.json"
    info: dict[str, Any] = {}
    if config.is_file():
        try:
            loaded = json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {config}: {exc}") from None
        info = loaded if isinstance(loaded, dict) else {}
    names = info.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) < seen:
            raise DataError(f"{config}: class_names must be a list of at least {seen} names")
        return list(names)
    count = max(seen, int(info.get("num_classes", seen)))
    return [f"class {c}" for c in range(count)]


def load_pfl_folder(root: Path) -> tuple[ImageSet, list[tuple[np.ndarray, np.ndarray]]]:
    """Read every client's train and test file.

    Returns the pooled images (train files first, then test files, in client order) and, per client,
    the indices of its train and test samples in that pool.
    """
    root = Path(root).expanduser()
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise DataError(
            f"{root} is not a PFLlib folder: it needs train/ and test/ subfolders of <i>.npz files"
        )
    n_clients = len(list(train_dir.glob("*.npz")))
    if n_clients == 0:
        raise DataError(f"{train_dir} holds no .npz files")
    chunks: list[tuple[np.ndarray, np.ndarray]] = []
    for split_dir in (train_dir, test_dir):
        for i in range(n_clients):
            path = split_dir / f"{i}.npz"
            if not path.is_file():
                raise DataError(f"{path} is missing: client files must be numbered 0 … {n_clients - 1}")
            chunks.append(read_client_images(path))
    shapes = {c[0].shape[1:] for c in chunks if c[0].shape[0]}
    if len(shapes) > 1:
        raise DataError(f"{root}: clients' images differ in shape: {sorted(shapes)}")
    images = np.concatenate([c[0] for c in chunks])
    labels = np.concatenate([c[1] for c in chunks])
    if labels.size and labels.min() < 0:
        raise DataError(f"{root}: labels must be non-negative")
    offsets = np.cumsum([0] + [c[1].shape[0] for c in chunks])
    spans = [np.arange(offsets[k], offsets[k + 1]) for k in range(len(chunks))]
    per_client = [(spans[i], spans[n_clients + i]) for i in range(n_clients)]
    names = class_names_from(root, int(labels.max()) + 1 if labels.size else 0)
    return ImageSet(images, labels, names, source=f"PFLlib folder {root}"), per_client
