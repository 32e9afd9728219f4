"""The fixed simplex equiangular tight frame (ETF) classifier every client shares."""

from __future__ import annotations

import math

import torch

__all__ = ["simplex_etf"]


def simplex_etf(num_classes: int, dim: int | None = None, *, seed: int = 0) -> torch.Tensor:
    """Build a ``(dim, C)`` simplex ETF: unit columns with pairwise cosine ``-1/(C-1)``.

    ``M = sqrt(C/(C-1)) · P (I - 11ᵀ/C)`` with ``P`` a ``(dim, C)`` matrix of orthonormal columns drawn
    from a seeded Gaussian (QR in float64, so every client and the server compute the same matrix from the
    same seed). The columns of ``I - 11ᵀ/C`` have norm ``sqrt((C-1)/C)``, so the columns of ``M`` are unit.

    Parameters
    ----------
    num_classes
        C ≥ 2.
    dim
        K, the head's output dimension; ``K ≥ C`` (FedKTL uses ``K = C``). Defaults to C.
    seed
        The federation's ETF seed.
    """
    c = int(num_classes)
    k = c if dim is None else int(dim)
    if c < 2:
        raise ValueError(f"a simplex ETF needs at least 2 classes, got {c}")
    if k < c:
        raise ValueError(f"ETF dimension K={k} must be at least the number of classes C={c}")
    gen = torch.Generator().manual_seed(int(seed))
    a = torch.randn(k, c, generator=gen, dtype=torch.float64)
    p, _ = torch.linalg.qr(a)  # (k, c), orthonormal columns
    centering = torch.eye(c, dtype=torch.float64) - torch.full((c, c), 1.0 / c, dtype=torch.float64)
    etf = math.sqrt(c / (c - 1)) * p @ centering
    return etf.float()
