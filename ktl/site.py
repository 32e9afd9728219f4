"""One site's own data, and nothing of anybody else's: what ``ktl client run --site DIR`` trains on.

A site folder holds that site's training and test files as PFLlib writes them for one client:

- ``DIR/train.npz`` and ``DIR/test.npz``; or
- PFLlib's own layout with only this site's files, ``DIR/train/<i>.npz`` and ``DIR/test/<i>.npz``
  (``--client-index i``; the other clients' files need not be there and are never read).

Each file holds arrays ``x``/``y`` or PFLlib's pickled ``data`` dict (read with the numpy-only unpickler
of `ktl.data.pfl`). An optional ``DIR/config.json`` may give ``class_names``. Nothing is subsampled:
a preset's ``data.*`` settings do not apply to a site's own data.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ktl.clients.trainer import LocalData
from ktl.data.pfl import read_client_images
from ktl.errors import DataError

__all__ = ["load_site", "site_files"]


def site_files(root: Path, index: int | None) -> tuple[Path, Path]:
    """The site's train and test files (see the module); `DataError` naming the layouts otherwise."""
    root = Path(root).expanduser()
    flat = (root / "train.npz", root / "test.npz")
    if flat[0].is_file() and flat[1].is_file():
        return flat
    if index is not None:
        nested = (root / "train" / f"{index}.npz", root / "test" / f"{index}.npz")
        if nested[0].is_file() and nested[1].is_file():
            return nested
    where = f" or train/{index}.npz and test/{index}.npz" if index is not None else ""
    raise DataError(f"{root} is not a site folder: it needs train.npz and test.npz{where}")


def _read(path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = read_client_images(path)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in [0, {num_classes}) (the federation's classes)")
    return torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y)


def load_site(root: Path, *, num_classes: int, index: int | None = None) -> LocalData:
    """The site's data as a client trains on it (images in [0, 1]); labels checked against the
    federation's ``num_classes``."""
    train, test = site_files(root, index)
    train_x, train_y = _read(train, num_classes)
    test_x, test_y = _read(test, num_classes)
    if train_x.shape[0] == 0:
        raise DataError(f"{train} holds no training samples")
    if test_x.shape[0] and test_x.shape[1:] != train_x.shape[1:]:
        raise DataError(
            f"{root}: test images {tuple(test_x.shape[1:])} differ from train {tuple(train_x.shape[1:])}"
        )
    return LocalData(train_x, train_y, test_x, test_y)
