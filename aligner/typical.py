"""The generator's typical set, as the band of latent norms its prior draws fall in.

A W-dimensional prior concentrates on a thin shell: for N(0, I_W) the norm of a draw is ≈ sqrt(W) ± 0.71
(W = 256: 16.0 ± 0.7, 99 % of draws in [14.2, 17.8]), and a generator is trained on latents from that shell
only. A latent well inside it (norm 8) or outside it (norm 40) is one the generator never saw; its image is
an off-manifold blob even when the latent has a high density (the centre of a Gaussian). The band is read
off prior draws — the sampled prior's own (a StyleGAN's w) or, for an exact N(0, I) prior, draws from a
fixed private stream — so the same code serves every generator, and the thresholds come from the prior,
not from a constant.

`NormBand` holds the central ``coverage`` interval of the prior's norms (``lo``, ``hi``) and its median;
`NormBand.distance` is how far a latent's norm lies outside the interval (0 inside); `NormBand.project`
moves a latent radially into it (truncation, as StyleGAN users truncate towards the mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NORM_BAND_DRAWS", "TYPICAL_COVERAGE", "NormBand", "standard_normal_draws"]

# The central 99 % of the prior's norms: a centroid drawn from the prior itself leaves it 1 % of the time.
TYPICAL_COVERAGE = 0.99
# The 0.5 % tails of 4096 draws rest on ~20 draws each: the band's ends move < 0.1 (W = 256).
NORM_BAND_DRAWS = 4096


def standard_normal_draws(n: int, dim: int, *, seed: int = 0) -> torch.Tensor:
    """``(n, dim)`` N(0, I) draws from a private CPU stream (``seed``): a fixed band, no round's stream touched."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@dataclass(frozen=True)
class NormBand:
    """The central ``coverage`` interval ``[lo, hi]`` of the prior's latent norms, and their median."""

    lo: float
    hi: float
    median: float
    coverage: float

    @classmethod
    def from_draws(cls, draws: torch.Tensor, coverage: float = TYPICAL_COVERAGE) -> NormBand:
        """The band of ``(m, W)`` prior draws (m ≥ 2): the ``(1 ± coverage)/2`` quantiles of their norms."""
        if draws.shape[0] < 2 or not 0 < coverage < 1:
            raise ValueError("a norm band needs at least two draws and a coverage in (0, 1)")
        norms = draws.detach().double().cpu().norm(dim=1)
        tail = (1.0 - coverage) / 2.0
        lo, median, hi = torch.quantile(norms, torch.tensor([tail, 0.5, 1.0 - tail], dtype=torch.float64))
        return cls(lo=float(lo), hi=float(hi), median=float(median), coverage=coverage)

    def distance(self, norms: torch.Tensor) -> torch.Tensor:
        """How far each norm lies outside ``[lo, hi]`` (0 inside), in the norms' units."""
        return (self.lo - norms).clamp_min(0) + (norms - self.hi).clamp_min(0)

    def project(self, latents: torch.Tensor) -> torch.Tensor:
        """Rows of ``latents`` rescaled radially so that their norms lie in ``[lo, hi]`` (rows inside unchanged;
        a zero row stays zero)."""
        norms = latents.norm(dim=1, keepdim=True)
        target = norms.clamp(self.lo, self.hi)
        return latents * torch.where(norms > 0, target / norms.clamp_min(1e-30), torch.ones_like(norms))
