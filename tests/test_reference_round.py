"""The faithful reference loop used by `ktl bench server` behaves like the reference, defects included."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ktl.aligner import prior_bandwidths
from ktl.benchmarks.reference_round import (
    ReferenceServer,
    ReferenceSettings,
    alignment_loss,
    numpy_normal_prior,
    reference_mmd,
)
from ktl.clients import simplex_etf


def _uploads(c: int = 4, clients: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    v = F.normalize(
        simplex_etf(c, seed=0).T.repeat(clients, 1) + 0.2 * torch.randn(c * clients, c, generator=g)
    )
    return v, torch.arange(c).repeat(clients)


def _server(tmp_path: Path, w: int = 16, epochs: int = 2, **kw) -> ReferenceServer:
    return ReferenceServer(
        num_classes=4,
        proto_dim=4,
        latent_dim=w,
        sample_prior=numpy_normal_prior(w, "cpu"),
        device="cpu",
        workdir=tmp_path,
        settings=ReferenceSettings(epochs=epochs),
        **kw,
    )


def test_one_round_runs_persists_whole_modules_and_logs_every_step(tmp_path: Path) -> None:
    v, y = _uploads()
    server = _server(tmp_path)
    centroids = server.align(list(zip(v, y.tolist(), strict=True)))
    assert centroids.shape == (4, 16) and bool(torch.isfinite(centroids).all())
    assert len(server.step_losses) == 2  # 24 uploads → one batch of ≤ 100 per epoch
    assert {p.name for p in tmp_path.iterdir()} >= {
        "Server_F.pt",
        "Server_Centroids.pt",
        "Server_latent_centroids.pt",
    }
    f = torch.load(tmp_path / "Server_F.pt", weights_only=False)  # our own test file
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in f.modules())
    out = server.transform(v)
    assert out.shape == (24, 16)


def test_its_batchnorm_fails_on_a_batch_of_one(tmp_path: Path) -> None:
    v, y = _uploads()
    server = _server(tmp_path)
    with pytest.raises(ValueError):
        server.align([(v[0], 0)])


def test_its_fixed_bandwidths_are_degenerate_for_wide_latents() -> None:
    # W = 256 standard normal: independent draws sit ~2W = 512 apart in squared distance, where
    # exp(-0.5 d / a) for a ≤ 50 is below 1e-2: a unit shift of every coordinate is nearly invisible.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 256, generator=g), torch.randn(100, 256, generator=g)
    same, shifted = float(reference_mmd(x, y)), float(reference_mmd(x + 1.0, y))
    h = prior_bandwidths(y)
    from ktl.aligner import mmd2_rbf

    assert shifted - same < 0.05 * float(reference_mmd(x * 0.0, y))  # a collapse is visible, a shift is not
    assert float(mmd2_rbf(x + 1.0, y, h)) > 10 * abs(float(mmd2_rbf(x, y, h)))  # ours sees the shift


def test_alignment_loss_drops_with_training_under_a_scaled_kernel(tmp_path: Path) -> None:
    v, y = _uploads()
    prior = torch.randn(1024, 16, generator=torch.Generator().manual_seed(1))
    h = prior_bandwidths(prior)
    from ktl.aligner import mmd2_rbf

    server = _server(tmp_path, epochs=60, mmd_fn=lambda a, b: mmd2_rbf(a, b, h, unbiased=False))
    before = alignment_loss(server.transform(v), y, prior, h, 1.0)
    server.align(list(zip(v, y.tolist(), strict=True)))
    after = alignment_loss(server.transform(v), y, prior, h, 1.0)
    assert after["loss"] < before["loss"] and all(x == x for x in after.values())
