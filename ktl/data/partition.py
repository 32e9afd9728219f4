"""Seeded partitions of a labelled set across clients, and the per-client train/test split.

Both partitions assign every sample to exactly one client. Per client the samples are then split
75/25 into train and test (PFLlib's ``train_ratio``), so each client is scored on its own distribution.
"""

from __future__ import annotations

import numpy as np

from ktl.errors import DataError

__all__ = ["dirichlet_partition", "pathological_partition", "split_train_test"]


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_samples: int = 20,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split: for each class, client shares ~ Dirichlet(α) (PFLlib's scheme).

    As in PFLlib, a client already holding more than N/num_clients samples gets no share of further
    classes, and the draw is repeated until every client holds at least ``min_samples`` samples.
    Smaller α gives more skew (α = 0.1: most clients see few classes).
    """
    if alpha <= 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}")
    n = labels.shape[0]
    if num_clients * min_samples > n:
        raise DataError(f"{n} samples cannot give {num_clients} clients {min_samples} samples each")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = np.where(sizes < n / num_clients, p, 0.0)
            p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * idx.shape[0]).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
                sizes[client] += chunk.shape[0]
        if sizes.min() >= min_samples:
            return [np.sort(np.concatenate(p)) for p in parts]
    raise DataError(
        f"no Dirichlet({alpha}) draw in {max_tries} tries gave each of {num_clients} clients "
        f"{min_samples} samples; use fewer clients, a larger alpha or more data"
    )


def pathological_partition(
    labels: np.ndarray, num_clients: int, classes_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each client holds ``classes_per_client`` classes; each class's samples are split evenly among the
    clients that hold it. Classes are dealt cyclically, so every class has a holder whenever
    ``num_clients · classes_per_client ≥ C``."""
    classes = np.unique(labels)
    c = classes.shape[0]
    if not 1 <= classes_per_client <= c:
        raise DataError(f"classes per client must lie in [1, {c}], got {classes_per_client}")
    if num_clients * classes_per_client < c:
        raise DataError(
            f"{num_clients} clients × {classes_per_client} classes cannot cover {c} classes; "
            "every sample must belong to a client"
        )
    order = rng.permutation(classes)
    held = [
        [order[(i * classes_per_client + j) % c] for j in range(classes_per_client)]
        for i in range(num_clients)
    ]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in classes:
        holders = [i for i, h in enumerate(held) if cls in h]
        idx = rng.permutation(np.flatnonzero(labels == cls))
        for client, chunk in zip(holders, np.array_split(idx, len(holders)), strict=True):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def split_train_test(
    index: np.ndarray, train_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle a client's indices and split them; both sides keep ≥ 1 sample when there are ≥ 2."""
    if not 0 < train_fraction < 1:
        raise DataError(f"train fraction must lie in (0, 1), got {train_fraction}")
    idx = rng.permutation(index)
    n_train = int(round(train_fraction * idx.shape[0]))
    if idx.shape[0] >= 2:
        n_train = min(max(n_train, 1), idx.shape[0] - 1)
    return np.sort(idx[:n_train]), np.sort(idx[n_train:])
