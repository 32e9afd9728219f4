"""One site's own data, and nothing of anybody else's: what ``ktl client run --site DIR`` and a Flower
SuperNode started with ``--node-config "data-dir=DIR"`` train on.

A site folder holds that site's training and test files in one of three layouts:

- PFLlib's files for one client: ``DIR/train.npz`` and ``DIR/test.npz``;
- PFLlib's own layout with only this site's files, ``DIR/train/<i>.npz`` and ``DIR/test/<i>.npz``
  (``--client-index i`` / the node's ``partition-id``; the other clients' files need not be there and are
  never read);
- PNG images sorted by class, ``DIR/train/<class>/*.png`` and ``DIR/test/<class>/*.png`` (read as the
  ``image-folder`` data set reads them, `ktl.data.folder`): a class folder is named by one of the
  federation's class names (or by its label, ``0`` … ``C−1``); a class the site does not hold has no folder.

Each ``.npz`` holds arrays ``x``/``y`` or PFLlib's pickled ``data`` dict (read with the numpy-only unpickler
of `ktl.data.pfl`). Labels are checked against the federation's classes: over HTTP the federation's own
(its spec); on Flower the classes every site states in ``DIR/config.json`` (``class_names``, as a PFLlib
folder gives them) or, for ``.npz`` labels, ``num-classes=C`` in ``--node-config`` — the ServerApp refuses a
federation whose sites disagree. Nothing is subsampled: a preset's ``data.*`` settings do not apply to a
site's own data. A bad folder is one `DataError` line naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ktl.clients.trainer import LocalData
from ktl.data import FederatedData
from ktl.data.folder import load_image_folder
from ktl.data.pfl import class_names_from, read_client_images
from ktl.errors import DataError

__all__ = ["DATA_DIR_KEY", "NUM_CLASSES_KEY", "load_site", "node_site_data", "site_class_names", "site_files"]

DATA_DIR_KEY = "data-dir"  # --node-config key: the SuperNode's own site folder
NUM_CLASSES_KEY = "num-classes"  # --node-config key: C, where the site folder names no classes


def _is_image_site(root: Path) -> bool:
    train = root / "train"
    return train.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in train.iterdir())


def site_files(root: Path, index: int | None) -> tuple[Path, Path]:
    """The site's train and test files or class folders (see the module); `DataError` naming the
    layouts otherwise."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"site folder {root} does not exist")
    flat = (root / "train.npz", root / "test.npz")
    if flat[0].is_file() and flat[1].is_file():
        return flat
    if index is not None:
        nested = (root / "train" / f"{index}.npz", root / "test" / f"{index}.npz")
        if nested[0].is_file() and nested[1].is_file():
            return nested
    if _is_image_site(root) and (root / "test").is_dir():
        return root / "train", root / "test"
    where = f", or train/{index}.npz and test/{index}.npz" if index is not None else ""
    raise DataError(
        f"{root} is not a site folder: it needs train.npz and test.npz{where}, or train/<class>/*.png and "
        "test/<class>/*.png"
    )


def _check_labels(path: Path, y: np.ndarray, num_classes: int) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in [0, {num_classes}) (the federation's classes)")


def _read(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_client_images(path)
    _check_labels(path, y, num_classes)
    return x, y


def _read_images(
    folder: Path, class_names: list[str], image_size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """A ``<class>/*.png`` folder with labels in the federation's order: a class folder is named by a
    class name or by its label."""
    images = load_image_folder(folder, image_size)
    labels = []
    for name in images.class_names:
        if name in class_names:
            labels.append(class_names.index(name))
        elif name.isdigit() and int(name) < len(class_names):
            labels.append(int(name))
        else:
            shown = ", ".join(class_names[:10]) + (", …" if len(class_names) > 10 else "")
            raise DataError(f"{folder / name}: {name!r} is not one of the federation's classes ({shown})")
    mapping = np.asarray(labels, dtype=np.int64)
    return images.images, mapping[images.labels]


def load_site(
    root: Path, *, num_classes: int, index: int | None = None, class_names: list[str] | None = None
) -> LocalData:
    """The site's data as a client trains on it (images in [0, 1]); labels checked against the
    federation's ``num_classes`` (class folders against its ``class_names``, default ``class <c>``)."""
    root = Path(root).expanduser()
    train, test = site_files(root, index)
    if train.is_dir():
        names = class_names or [f"class {c}" for c in range(num_classes)]
        train_x, train_y = _read_images(train, names, None)
        test_x, test_y = _read_images(test, names, train_x.shape[-1])
    else:
        train_x, train_y = _read(train, num_classes)
        test_x, test_y = _read(test, num_classes)
    if train_x.shape[0] == 0:
        raise DataError(f"{train} holds no training samples")
    if test_x.shape[0] and test_x.shape[1:] != train_x.shape[1:]:
        raise DataError(
            f"{root}: test images {tuple(test_x.shape[1:])} differ from train {tuple(train_x.shape[1:])}"
        )

    def pixels(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).float().div_(255.0)

    return LocalData(pixels(train_x), torch.from_numpy(train_y), pixels(test_x), torch.from_numpy(test_y))


def site_class_names(root: Path, num_classes: int | None = None) -> list[str]:
    """The federation's classes as a site states them: ``DIR/config.json``'s ``class_names`` (or its
    ``num_classes``), else ``num_classes`` names ``class <c>``; `DataError` when neither says."""
    names = class_names_from(Path(root).expanduser(), num_classes or 0)
    if not names:
        raise DataError(
            f"{root}: the federation's classes are unknown — give class_names in {Path(root) / 'config.json'} "
            f"or {NUM_CLASSES_KEY}=C in --node-config"
        )
    return names


def node_site_data(node_config: Mapping[str, Any], index: int) -> FederatedData | None:
    """The data of a SuperNode started with ``--node-config "data-dir=DIR"`` (None without it): client
    ``index`` (its ``partition-id``) on DIR's files alone. Only split ``index`` of the result is ever read
    (the client is built as ``ktl simulate`` builds client ``index``: its model, seeds and id)."""
    root = node_config.get(DATA_DIR_KEY)
    if root is None or str(root) == "":
        return None
    raw = node_config.get(NUM_CLASSES_KEY)
    try:
        num_classes = int(raw) if raw is not None else None
    except (TypeError, ValueError):
        raise DataError(f"--node-config {NUM_CLASSES_KEY} must be an integer, got {raw!r}") from None
    names = site_class_names(Path(str(root)), num_classes)
    local = load_site(Path(str(root)), num_classes=len(names), index=index, class_names=names)
    return FederatedData(clients=[local] * (index + 1), class_names=names, source=f"site {root}")
