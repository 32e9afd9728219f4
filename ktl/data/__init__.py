"""Data sets, partitions and per-client splits (``ktl.data``).

`build_federated_data` turns a `DataConfig` into one `LocalData` per client. Data sets and partition
schemes are registries (``DATASETS``, ``PARTITIONS``), so adding one is a decorator, not an elif.

The data set protocol (`DatasetLoader`): ``loader(config, seed) -> (images, splits)`` where ``images`` is
an `ImageSet` — uint8 ``(N, C, S, S)`` pixels (square), int64 labels in ``[0, len(class_names))`` and the
class names — and ``splits`` is either None (one pooled set: ktl subsamples it by ``data.fraction`` and
partitions it by ``data.partition``) or, for data that is already per client, one ``(train, test)`` pair of
index arrays into ``images`` per client (`pool_clients` builds both from per-client arrays). Register one
with ``@register_dataset("name")``; see docs/extending.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ktl.clients.trainer import LocalData
from ktl.data.fashion_mnist import load_fashion_mnist
from ktl.data.folder import load_image_folder
from ktl.data.images import ImageSet
from ktl.data.partition import dirichlet_partition, pathological_partition, split_train_test
from ktl.data.pfl import load_pfl_folder
from ktl.data.synthetic import make_synthetic
from ktl.errors import DataError

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "DataConfig",
    "DatasetLoader",
    "FederatedData",
    "GlobalTest",
    "ImageSet",
    "Splits",
    "build_federated_data",
    "held_out_split",
    "pool_clients",
    "register_dataset",
]


# The held-out global test set: bounded (its float pixels live in memory beside the clients'), and drawn
# with one fixed seed so that every run seed and method of a scenario is scored on the same images.
MAX_GLOBAL_TEST = 20_000
GLOBAL_TEST_SEED = 0x610BA1


class DataConfig(BaseModel):
    """Which data, how much of it, and how it is spread over clients."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        "fashion-mnist",
        description="fashion-mnist, synthetic, pfl-npz (per-client .npz folders as PFLlib writes them), "
        "image-folder (PNG files in one subfolder per class), or a plugin's (docs/extending.md)",
    )
    path: Path | None = Field(
        None,
        description="Data folder; for fashion-mnist the fallbacks are $KTL_DATA_DIR, then "
        "/usr/share/datasets/fashion-mnist; for image-folder, the folder holding one subfolder per class",
    )
    image_size: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="image-folder: every image is resized (bilinear) to this side; none = the images' own "
        "side when all are the same square size, else 32",
    )
    fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Seeded random subsample of the whole set, before partitioning (per client for pfl-npz)",
    )
    partition: Literal["dirichlet", "pathological"] = Field(
        "dirichlet",
        description="dirichlet (label skew by Dirichlet(α)) or pathological (k classes per client)",
    )
    alpha: float = Field(
        0.1, gt=0, description="Dirichlet concentration; smaller is more skewed (0.1 = strongly label-skewed)"
    )
    classes_per_client: int = Field(2, ge=1, description="k of the pathological partition")
    train_fraction: float = Field(
        0.75,
        gt=0,
        lt=1,
        description="Per-client train share; the rest is that client's test set (PFLlib's 0.75)",
    )
    min_samples: int = Field(
        20, ge=2, description="Dirichlet draws are repeated until every client holds this many samples"
    )
    shots: int | None = Field(
        None,
        ge=1,
        description="Few-shot: keep at most this many labelled training samples per class on each client "
        "(seeded); the test split is untouched. none = all",
    )
    global_test_size: int = Field(
        0,
        ge=0,
        le=MAX_GLOBAL_TEST,
        description="Held-out global test set: this many samples of the pooled set that no client trains or "
        "tests on, drawn before data.fraction and the partition with a fixed seed (the same set for every "
        "run seed and method), at most half the pool; every client is also scored on it "
        "(study.global_eval_rounds). 0 = none (off by default: it changes the partition's draw)",
    )


@dataclass(frozen=True)
class GlobalTest:
    """The held-out global test set: float pixels in [0, 1] ``(n, C, S, S)`` and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True)
class FederatedData:
    clients: list[LocalData]
    class_names: list[str]
    source: str
    global_test: GlobalTest | None = None  # data.global_test_size > 0: samples no client holds

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_channels(self) -> int:
        return self.clients[0].num_channels

    @property
    def image_size(self) -> int:
        return self.clients[0].image_size


# A data set loader returns the pooled images and, for pre-partitioned data, each client's (train, test)
# indices into them; None means "partition me" (see the module docstring).
Splits = list[tuple[np.ndarray, np.ndarray]]
DatasetLoader = Callable[[DataConfig, int], tuple[ImageSet, Splits | None]]
Partitioner = Callable[[np.ndarray, int, DataConfig, np.random.Generator], list[np.ndarray]]

DATASETS: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: make ``loader(config, seed)`` the data set ``name`` (``--data.dataset name``)."""

    def wrap(loader: DatasetLoader) -> DatasetLoader:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = loader
        return loader

    return wrap


@register_dataset("fashion-mnist")
def _fashion_mnist(cfg: DataConfig, seed: int) -> tuple[ImageSet, Splits | None]:
    return load_fashion_mnist(cfg.path), None


@register_dataset("synthetic")
def _synthetic(cfg: DataConfig, seed: int) -> tuple[ImageSet, Splits | None]:
    return make_synthetic(samples_per_class=300, seed=seed), None


@register_dataset("image-folder")
def _image_folder(cfg: DataConfig, seed: int) -> tuple[ImageSet, Splits | None]:
    if cfg.path is None:
        raise DataError(
            "dataset image-folder needs --data.path, a folder with one subfolder of PNGs per class"
        )
    return load_image_folder(cfg.path, cfg.image_size), None


def pool_clients(
    clients: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    class_names: list[str],
    source: str = "",
) -> tuple[ImageSet, Splits]:
    """Per-client arrays ``(x_train, y_train, x_test, y_test)`` (uint8 ``(n, C, S, S)`` images, int labels)
    → the pooled `ImageSet` (every train set, then every test set, in client order) and each client's
    ``(train, test)`` indices into it: what a loader of already-partitioned data returns."""
    if not clients:
        raise DataError(f"{source or 'dataset'}: no clients")
    xs = [c[0] for c in clients] + [c[2] for c in clients]
    ys = [np.asarray(c[1], dtype=np.int64) for c in clients] + [
        np.asarray(c[3], dtype=np.int64) for c in clients
    ]
    sizes = [len(y) for y in ys]
    if any(len(x) != n for x, n in zip(xs, sizes, strict=True)):
        raise DataError(f"{source or 'dataset'}: a client's images and labels differ in length")
    if len({x.shape[1:] for x in xs}) != 1:
        raise DataError(f"{source or 'dataset'}: clients' images differ in shape")
    ends = np.cumsum(sizes)
    starts = ends - sizes
    n = len(clients)
    splits = [(np.arange(starts[i], ends[i]), np.arange(starts[n + i], ends[n + i])) for i in range(n)]
    pooled = ImageSet(
        np.concatenate(xs).astype(np.uint8, copy=False), np.concatenate(ys), class_names, source
    )
    return pooled, splits


@register_dataset("pfl-npz")
def _pfl(cfg: DataConfig, seed: int) -> tuple[ImageSet, Splits | None]:
    if cfg.path is None:
        raise DataError("dataset pfl-npz needs --data.path, a folder with train/ and test/ <i>.npz files")
    return load_pfl_folder(cfg.path)


PARTITIONS: dict[str, Partitioner] = {
    "dirichlet": lambda y, n, cfg, rng: dirichlet_partition(
        y, n, cfg.alpha, rng, min_samples=cfg.min_samples
    ),
    "pathological": lambda y, n, cfg, rng: pathological_partition(y, n, cfg.classes_per_client, rng),
}


def _subsample(index: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A seeded random ``fraction`` of ``index`` (at least one element), in ascending order."""
    if fraction >= 1:
        return index
    size = max(1, round(fraction * index.shape[0]))
    return np.sort(rng.choice(index, size=size, replace=False))


def _few_shot(train: np.ndarray, labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``shots`` indices of each class from ``train`` (seeded), in ascending order."""
    keep = [
        rng.choice(idx, size=min(shots, idx.shape[0]), replace=False)
        for c in np.unique(labels[train])
        for idx in [train[labels[train] == c]]
    ]
    return np.sort(np.concatenate(keep)) if keep else train


def _to_local(images: ImageSet, train: np.ndarray, test: np.ndarray) -> LocalData:
    def pixels(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images.images[idx]).float().div_(255.0)

    def labels(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images.labels[idx]).long()

    return LocalData(pixels(train), labels(train), pixels(test), labels(test))


def held_out_split(
    config: DataConfig, images: ImageSet, splits: Splits | None, *, num_clients: int, seed: int
) -> tuple[Splits, np.ndarray]:
    """Each client's ``(train, test)`` indices into ``images`` and the held-out global test indices (empty
    when ``config.global_test_size`` is 0): the global set first (a fixed-seed draw from the whole pool,
    independent of ``seed``), then ``fraction``, the partition and each client's split on the rest."""
    rng = np.random.default_rng([seed, 0xDA7A])
    held = np.zeros(0, dtype=np.int64)
    if config.global_test_size:
        if splits is not None:
            raise DataError(
                f"data.global_test_size needs a pooled data set; {images.source} is already split per client"
            )
        if config.global_test_size > len(images) // 2:
            raise DataError(
                f"data.global_test_size {config.global_test_size} is more than half of the "
                f"{len(images)} samples of {images.source}"
            )
        fixed = np.random.default_rng(GLOBAL_TEST_SEED)
        held = np.sort(fixed.choice(len(images), size=config.global_test_size, replace=False))
    if splits is None:
        pool = np.setdiff1d(np.arange(len(images)), held, assume_unique=True)
        keep = _subsample(pool, config.fraction, rng)
        parts = PARTITIONS[config.partition](images.labels[keep], num_clients, config, rng)
        splits = [split_train_test(keep[p], config.train_fraction, rng) for p in parts]
    else:
        if len(splits) != num_clients:
            raise DataError(f"{images.source} holds {len(splits)} clients but num_clients is {num_clients}")
        splits = [
            (_subsample(tr, config.fraction, rng), _subsample(te, config.fraction, rng)) for tr, te in splits
        ]
    if config.shots is not None:
        splits = [(_few_shot(tr, images.labels, config.shots, rng), te) for tr, te in splits]
    return splits, held


def build_federated_data(config: DataConfig, *, num_clients: int, seed: int) -> FederatedData:
    """Load ``config.dataset``, hold out the global test set (if any), subsample, partition over
    ``num_clients`` and split each client 75/25 (`held_out_split`)."""
    loader = DATASETS.get(config.dataset)
    if loader is None:
        raise DataError(f"unknown dataset {config.dataset!r}; available: {', '.join(sorted(DATASETS))}")
    images, given = loader(config, seed)
    splits, held = held_out_split(config, images, given, num_clients=num_clients, seed=seed)
    clients = [_to_local(images, train, test) for train, test in splits]
    global_test = None
    if held.size:
        pixels = torch.from_numpy(images.images[held]).float().div_(255.0)
        global_test = GlobalTest(pixels, torch.from_numpy(images.labels[held]).long())
    return FederatedData(
        clients=clients, class_names=images.class_names, source=images.source, global_test=global_test
    )
