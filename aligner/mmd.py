"""Maximum mean discrepancy with a mixture of RBF kernels whose bandwidths follow the data's scale.

Why the bandwidths are scaled, not fixed
----------------------------------------
An RBF kernel ``exp(-‖a-b‖² / h)`` only carries signal when ``h`` is on the scale of the squared
distances it sees. For latents drawn from a W-dimensional prior with covariance Σ, the squared distance
between two independent draws concentrates around ``2·tr(Σ)`` (``2W`` for a standard normal), with relative
spread ``O(1/sqrt(W))``. The reference code's fixed bandwidths 10–50 (kernel ``exp(-d/(2a))``) give, for
a StyleGAN w with W = 512, kernel values around ``exp(-1024/100) ≈ 4e-5``: every kernel entry and its
gradient vanish, and MMD stops telling distributions apart. We therefore set the base bandwidth to the
*mean* squared inter-sample distance of the prior, ``h₀ = 2·tr(Σ̂)`` (estimated from a prior sample; for
high-dimensional latents it equals the median heuristic up to ``O(1/sqrt(W))``, and unlike the median it
is a cheap O(nW) reduction with a smooth dependence on the sample), and sum kernels at ``h₀·{1/4, 1/2, 1,
2, 4}`` so both the coarse placement and the finer structure of the prototypes are matched. A typical
pair then sits at kernel values between ``e^-4`` and ``e^-1/4``, never in a flat tail.

Squared distances are formed as ``‖a‖² + ‖b‖² - 2a·b`` and clamped at 0; there is no square root, so the
gradient is finite at zero distance on every backend (a distance taken through ``sqrt`` has an infinite
derivative there; an MMD built on ``torch.cdist`` gave NaN gradients at zero distance in an independent
check).
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_BANDWIDTH_MULTIPLIERS", "squared_distances", "prior_bandwidths", "mmd2_rbf"]

DEFAULT_BANDWIDTH_MULTIPLIERS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


def squared_distances(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise squared Euclidean distances between rows, ``(n, m)``, clamped at 0, sqrt-free."""
    b = a if b is None else b
    sq_a = (a * a).sum(dim=1)
    sq_b = sq_a if b is a else (b * b).sum(dim=1)
    return (sq_a[:, None] + sq_b[None, :] - 2.0 * (a @ b.T)).clamp_min(0.0)


def prior_bandwidths(
    prior: torch.Tensor, multipliers: tuple[float, ...] | list[float] = DEFAULT_BANDWIDTH_MULTIPLIERS
) -> torch.Tensor:
    """Bandwidths ``h₀·multipliers`` with ``h₀ = 2·tr(Cov(prior))``, the mean squared inter-sample distance.

    Parameters
    ----------
    prior
        ``(m, W)`` samples of the generator's latent prior, ``m ≥ 2``.
    """
    if prior.shape[0] < 2:
        raise ValueError("need at least two prior samples to estimate a bandwidth")
    h0 = 2.0 * prior.detach().float().var(dim=0).sum().clamp_min(1e-12)
    return h0 * torch.tensor(list(multipliers), dtype=h0.dtype, device=h0.device)


def mmd2_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Squared MMD between samples ``x`` (n, W) and ``y`` (m, W) under ``Σ_h exp(-d/h)``.

    One distance matrix over the pooled samples serves every bandwidth. With ``unbiased=True`` (the
    U-statistic) the diagonal of the within-sample blocks is left out, so the estimate is ≈ 0 (it may be
    slightly negative) when both samples come from one distribution; a sample of one row contributes no
    within-sample term.
    """
    n = x.shape[0]
    z = torch.cat([x, y.to(x.dtype)], dim=0)
    d = squared_distances(z)
    k = torch.exp(-d.unsqueeze(0) / bandwidths.to(d.dtype).view(-1, 1, 1)).sum(dim=0)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return _within(kxx, unbiased) + _within(kyy, unbiased) - 2.0 * kxy.mean()


def _within(k: torch.Tensor, unbiased: bool) -> torch.Tensor:
    n = k.shape[0]
    if not unbiased:
        return k.mean()
    if n < 2:
        return k.new_zeros(())
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))
