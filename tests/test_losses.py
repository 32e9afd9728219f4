import math

import torch

from ktl.clients import distillation_loss, margin_logits, margin_loss, simplex_etf


def test_margin_loss_finite_at_cosines_plus_and_minus_one() -> None:
    etf = simplex_etf(10, seed=0)
    # Head outputs exactly on ETF columns: cosine +1 with their own column …
    aligned = etf.T.clone().requires_grad_(True)
    labels = torch.arange(10)
    # … and exactly opposite: cosine -1 with the labelled column.
    opposite = (-etf.T).clone().requires_grad_(True)
    for head_out in (aligned, opposite):
        loss = margin_loss(head_out, etf, labels)
        loss.backward()
        assert torch.isfinite(loss)
        assert head_out.grad is not None and torch.isfinite(head_out.grad).all()


def test_reference_formula_is_nan_at_cosine_one() -> None:
    # The defect we avoid: acos of an unclamped cosine has an infinite derivative at 1.
    cos = torch.tensor([1.0], requires_grad=True)
    torch.cos(torch.acos(cos) + 0.5).sum().backward()
    assert not torch.isfinite(cos.grad).all()


def test_margin_lowers_the_target_logit_only() -> None:
    etf = simplex_etf(5, seed=1)
    head_out = torch.randn(8, 5)
    labels = torch.randint(0, 5, (8,))
    plain = margin_logits(head_out, etf, labels, margin=0.0, scale=1.0)
    with_margin = margin_logits(head_out, etf, labels, margin=0.5, scale=1.0)
    target = torch.nn.functional.one_hot(labels, 5).bool()
    assert (with_margin[target] < plain[target]).all()
    torch.testing.assert_close(with_margin[~target], plain[~target])


def test_target_logit_is_monotone_in_the_cosine() -> None:
    # Past θ + m > π, cos(θ + m) would rise again; the fallback keeps worse samples scoring lower.
    etf = torch.eye(2)
    angles = torch.linspace(0, math.pi, 200)
    head_out = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    logits = margin_logits(head_out, etf, torch.zeros(200, dtype=torch.long), margin=0.5, scale=1.0)[:, 0]
    assert (logits[1:] <= logits[:-1] + 1e-6).all()


def test_distillation_loss_is_invariant_to_latent_scale() -> None:
    latents = torch.randn(6, 32)
    pred = torch.randn(6, 32)
    for scale in (1e-3, 1.0, 1e3):
        z = latents * scale
        rms = z.pow(2).mean().sqrt()
        torch.testing.assert_close(
            distillation_loss(pred, z, rms), distillation_loss(pred, latents, latents.pow(2).mean().sqrt())
        )
    # An untouched projector (predicting 0) starts at loss 1 whatever the scale.
    z = latents * 1e3
    torch.testing.assert_close(
        distillation_loss(torch.zeros_like(z), z, z.pow(2).mean().sqrt()), torch.tensor(1.0)
    )
