from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ktl.aligner import Aligner, AlignerSettings, FeatureTransformer, class_centroids
from ktl.clients import simplex_etf

W = 64


def prior(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, W, generator=g)


def uploads(num_classes: int = 10, num_clients: int = 20, noise: float = 0.1, seed: int = 0):
    """Each client sends every class: its ETF column plus client noise, renormalised."""
    g = torch.Generator().manual_seed(seed)
    etf = simplex_etf(num_classes, seed=seed)
    vectors = etf.T.repeat(num_clients, 1) + noise * torch.randn(
        num_classes * num_clients, num_classes, generator=g
    )
    class_ids = torch.arange(num_classes).repeat(num_clients)
    counts = torch.randint(1, 50, (num_classes * num_clients,), generator=g)
    return F.normalize(vectors, dim=1), class_ids, counts


def fit(aligner: Aligner, seed: int = 0):
    v, y, n = uploads(seed=seed)
    return aligner.fit(v, y, n, sample_prior=prior, generator=torch.Generator().manual_seed(seed))


def test_loss_drops_and_class_centroids_stay_apart() -> None:
    aligner = Aligner.create(
        num_classes=10, proto_dim=10, latent_dim=W, settings=AlignerSettings(steps=150), seed=0
    )
    result = fit(aligner)
    losses = result.history["loss"]
    assert len(losses) == 150 and all(map(lambda v: v == v and abs(v) < 1e6, losses))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert bool(result.present.all())
    c = result.centroids
    dist = torch.cdist(c, c)[~torch.eye(10, dtype=torch.bool)]
    spread = (result.aligned - c[torch.arange(10).repeat(20)]).norm(dim=1).mean()
    # Centroids spread like prior samples (typical distance sqrt(2W) ≈ 11) and far beyond in-class spread.
    assert float(dist.min()) > 0.3 * (2 * W) ** 0.5
    assert float(dist.min()) > 5 * float(spread)


def test_centroids_are_count_weighted_means_and_absent_classes_are_zero() -> None:
    q = torch.tensor([[0.0, 0.0], [3.0, 3.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 2])
    w = torch.tensor([1, 2, 5])
    cent, present = class_centroids(q, y, w, 3)
    torch.testing.assert_close(cent, torch.tensor([[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]]))
    assert present.tolist() == [True, False, True]


def test_single_prototype_batch_works() -> None:
    # The reference's BatchNorm F raised on a batch of one; ours trains on it.
    aligner = Aligner.create(
        num_classes=3, proto_dim=3, latent_dim=W, settings=AlignerSettings(steps=5), seed=0
    )
    one = F.normalize(torch.randn(1, 3), dim=1)
    result = aligner.fit(
        one,
        torch.tensor([1]),
        torch.tensor([4]),
        sample_prior=prior,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.present.tolist() == [False, True, False]
    assert torch.isfinite(result.centroids).all()
    aligner.transformer.train()
    assert aligner.transformer(one).shape == (1, W)


def test_warm_start_keeps_f_between_rounds() -> None:
    aligner = Aligner.create(
        num_classes=10, proto_dim=10, latent_dim=W, settings=AlignerSettings(steps=100), seed=0
    )
    first = fit(aligner, seed=0)
    second = fit(aligner, seed=0)
    assert second.history["loss"][0] < 0.5 * first.history["loss"][0]


def test_save_and_load_roundtrip(tmp_path: Path) -> None:
    settings = AlignerSettings(steps=20, hidden_dim=32, lam=0.5)
    aligner = Aligner.create(num_classes=10, proto_dim=10, latent_dim=W, settings=settings, seed=0)
    fit(aligner)
    aligner.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "aligner.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = Aligner.from_pretrained(tmp_path)
    x = torch.randn(4, 10)
    aligner.transformer.eval()
    loaded.transformer.eval()
    torch.testing.assert_close(loaded.transformer(x), aligner.transformer(x))
    assert loaded.settings == settings and loaded.num_classes == 10


def test_feature_transformer_uses_no_batchnorm() -> None:
    f = FeatureTransformer(10, W, hidden_dim=16, num_layers=3)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in f.modules())
    f.train()
    assert f(torch.randn(1, 10)).shape == (1, W)


def test_row_subsets_still_align_many_uploads() -> None:
    # 100 clients × 10 classes = 1000 rows > batch_size: each step sees a fresh subset of 128 rows.
    v, y, n = uploads(num_clients=100)
    settings = AlignerSettings(steps=150, batch_size=128)
    aligner = Aligner.create(num_classes=10, proto_dim=10, latent_dim=W, settings=settings, seed=0)
    result = aligner.fit(v, y, n, sample_prior=prior, generator=torch.Generator().manual_seed(0))
    losses = result.history["loss"]
    assert all(v == v and abs(v) < 1e6 for v in losses)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    # Judged on every row with a fresh prior sample: as close to the prior as a full-batch fit.
    from ktl.aligner import PriorKernel

    kernel = PriorKernel(prior(2048, torch.Generator().manual_seed(9)))
    full = Aligner.create(
        num_classes=10, proto_dim=10, latent_dim=W, settings=AlignerSettings(steps=150), seed=0
    ).fit(v, y, n, sample_prior=prior, generator=torch.Generator().manual_seed(0))
    sub_mmd = float(kernel.mmd2(result.aligned, prior(2048, torch.Generator().manual_seed(8))))
    full_mmd = float(kernel.mmd2(full.aligned, prior(2048, torch.Generator().manual_seed(8))))
    assert sub_mmd < 1.5 * full_mmd + 0.01
    c = result.centroids
    assert float(torch.cdist(c, c)[~torch.eye(10, dtype=torch.bool)].min()) > 0.3 * (2 * W) ** 0.5


def test_uniform_weights_give_the_plain_prior_mmd_and_zero_weights_drop_rows() -> None:
    from ktl.aligner.mmd import PriorKernel

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, W, generator=g, dtype=torch.float64)
    for kernel, y in (
        (PriorKernel.standard_normal(W), None),
        (PriorKernel(torch.randn(256, W, generator=g)), torch.randn(64, W, generator=g)),
    ):
        plain = kernel.mmd2(x, y)
        torch.testing.assert_close(kernel.mmd2(x, y, weights=torch.full((7,), 1 / 7)), plain)
        half = torch.tensor([0.25] * 4 + [0.0] * 3, dtype=torch.float64)  # rows 4–6 take no part
        torch.testing.assert_close(kernel.mmd2(x, y, weights=half), kernel.mmd2(x[:4], y))


def test_norm_band_holds_the_prior_quantiles_and_projects_radially() -> None:
    from ktl.aligner.typical import NormBand, standard_normal_draws

    band = NormBand.from_draws(standard_normal_draws(4096, 256))
    # chi with 256 degrees of freedom: 15.98 ± 0.71; its central 99 % ≈ 15.98 ∓ 2.58·0.71 = [14.2, 17.8]
    assert abs(band.lo - 14.2) < 0.2 and abs(band.hi - 17.8) < 0.2 and abs(band.median - 15.98) < 0.1
    rows = torch.randn(3, 256, dtype=torch.float64)
    rows = rows / rows.norm(dim=1, keepdim=True) * torch.tensor([[5.0], [16.0], [60.0]])
    out = band.project(rows)
    torch.testing.assert_close(out.norm(dim=1), torch.tensor([band.lo, 16.0, band.hi], dtype=torch.float64))
    torch.testing.assert_close(out[1], rows[1])  # inside: unchanged
    torch.testing.assert_close(
        torch.nn.functional.cosine_similarity(out, rows), torch.ones(3, dtype=torch.float64)
    )
    assert band.distance(torch.tensor([5.0, 16.0, 60.0])).tolist() == pytest.approx(
        [band.lo - 5, 0, 60 - band.hi]
    )
    assert torch.equal(band.project(torch.zeros(1, 256)), torch.zeros(1, 256))


def test_truncation_keeps_every_centroid_inside_the_band_and_paper_leaves_them() -> None:
    from ktl.aligner.typical import NormBand, standard_normal_draws

    v, y, n = uploads(num_clients=3)
    band = NormBand.from_draws(standard_normal_draws(4096, W), 0.95)
    far = v * 50  # rows mapped far from the prior's shell by a fresh F with 1 step
    for truncate in (False, True):
        aligner = Aligner.create(
            num_classes=10,
            proto_dim=10,
            latent_dim=W,
            settings=AlignerSettings(steps=1, lr=1e-6, objective="paper", truncate=truncate),
            seed=0,
        )
        res = aligner.fit(
            far,
            y,
            n,
            sample_prior=prior,
            generator=torch.Generator().manual_seed(0),
            standard_normal_prior=True,
        )
        norms = res.centroids.norm(dim=1)
        inside = bool(((norms >= band.lo - 1e-4) & (norms <= band.hi + 1e-4)).all())
        assert inside == truncate, norms
