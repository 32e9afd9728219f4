"""Differential privacy for uploaded prototypes: the Gaussian mechanism with zCDP accounting.

A client's upload in one round is, per class, the sum of its samples' L2-normalised head outputs (then
renormalised, which is post-processing). Adding or removing one training sample changes exactly one
class's sum by a unit vector, so the whole round's release has L2 sensitivity 1 and one Gaussian
mechanism with standard deviation σ covers it: it is ρ-zCDP with ρ = 1 / (2σ²) (Bun & Steinke 2016,
Prop. 1.6). Over R rounds zCDP composes additively (ρ_total = R·ρ, adaptive composition included: each
round's model depends on the last), and ρ-zCDP implies (ρ + 2·sqrt(ρ·ln(1/δ)), δ)-DP (Prop. 1.3).

Given a total (ε, δ) over the run, `noise_std` inverts that conversion: sqrt(ρ_total) =
sqrt(ln(1/δ) + ε) - sqrt(ln(1/δ)).

What this does not cover (documented, not hidden): which classes a client holds is sent in the clear
(``class_ids``), and the model the client trains is not itself released, so nothing else leaves it.
"""

from __future__ import annotations

import math

__all__ = ["epsilon_for", "noise_std"]


def _check(epsilon: float, delta: float, releases: int) -> None:
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be a positive number, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if releases < 1:
        raise ValueError(f"releases must be ≥ 1, got {releases}")


def noise_std(epsilon: float, delta: float, releases: int) -> float:
    """σ per release (sensitivity 1) so that ``releases`` Gaussian releases are (ε, δ)-DP in total."""
    _check(epsilon, delta, releases)
    log_term = math.log(1 / delta)
    rho_total = (math.sqrt(log_term + epsilon) - math.sqrt(log_term)) ** 2
    return math.sqrt(releases / (2 * rho_total))


def epsilon_for(std: float, delta: float, releases: int) -> float:
    """ε after ``releases`` Gaussian releases of standard deviation ``std`` (sensitivity 1) at δ."""
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    _check(1.0, delta, releases)
    rho = releases / (2 * std**2)
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))
