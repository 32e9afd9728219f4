"""Client losses: the ArcFace-style margin loss against the fixed ETF, and the distillation MSE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["etf_cosines", "margin_logits", "margin_loss", "distillation_loss"]

# Cosines are clamped this far inside [-1, 1] before acos: d/dx acos(x) = -1/sqrt(1-x²) is infinite at ±1
# (the reference code's NaN). At 1 - 1e-6 the derivative is about -707, finite in float32.
COS_EPS = 1e-6


def etf_cosines(head_out: torch.Tensor, etf: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of ``head_out`` (B, K) with each ETF column (K, C) → (B, C)."""
    return F.normalize(head_out, dim=1) @ F.normalize(etf, dim=0)


def margin_logits(
    head_out: torch.Tensor,
    etf: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.5,
    scale: float = 64.0,
) -> torch.Tensor:
    """ArcFace logits ``s·cos(θ_y + m)`` for the true class and ``s·cos θ_j`` for the others.

    The cosine is clamped to ``[-1 + ε, 1 - ε]`` before ``acos`` so the loss and its gradient stay finite
    for cosines of exactly ±1. Where ``θ_y + m > π`` the angular margin would make the logit grow again as
    the sample gets worse, so there the additive form ``cos θ_y - m·sin m`` (as in insightface) keeps it
    monotone.

    Parameters
    ----------
    head_out
        ``(B, K)`` head outputs (not necessarily normalised).
    etf
        ``(K, C)`` fixed classifier.
    labels
        ``(B,)`` int64 class indices.
    margin, scale
        ArcFace m (radians) and s; the reference's 0.5 and 64.
    """
    cos = etf_cosines(head_out, etf).clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)
    target = cos.gather(1, labels[:, None])
    with_margin = torch.cos(torch.acos(target) + margin)
    fallback = target - margin * math.sin(margin)
    target_logit = torch.where(target > math.cos(math.pi - margin), with_margin, fallback)
    return scale * cos.scatter(1, labels[:, None], target_logit)


def margin_loss(
    head_out: torch.Tensor,
    etf: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.5,
    scale: float = 64.0,
) -> torch.Tensor:
    """Cross-entropy over `margin_logits` (mean over the batch)."""
    return F.cross_entropy(margin_logits(head_out, etf, labels, margin=margin, scale=scale), labels)


def distillation_loss(
    predicted: torch.Tensor, latents: torch.Tensor, latent_rms: torch.Tensor | float
) -> torch.Tensor:
    """MSE between projected features and generator latents, both divided by the latents' RMS.

    Dividing by the RMS of the round's latents makes the target unit-scale whatever the generator (a
    StyleGAN w, a diffusion noise map, an aligned centroid pulled towards 0), so the weight μ means the same
    thing across generators and an untouched projector starts at loss ≈ 1 instead of ≈ W·σ².
    """
    return F.mse_loss(predicted, latents / latent_rms)
