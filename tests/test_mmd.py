import pytest
import torch

from ktl.aligner import mmd2_rbf, prior_bandwidths, squared_distances


@pytest.mark.parametrize("dim", [8, 256, 2048])
def test_mmd_near_zero_for_one_distribution_and_large_for_a_shift(dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    x, y = torch.randn(300, dim, generator=g), torch.randn(300, dim, generator=g)
    h = prior_bandwidths(torch.randn(2000, dim, generator=g))
    same = mmd2_rbf(x, y, h)
    shifted = mmd2_rbf(x + 1.0, y, h)  # a unit shift in every coordinate
    scaled = mmd2_rbf(x * 0.3, y, h)  # a collapsed distribution
    assert abs(float(same)) < 0.02
    assert float(shifted) > 20 * max(abs(float(same)), 1e-3)
    assert float(scaled) > 20 * max(abs(float(same)), 1e-3)


def test_fixed_reference_bandwidths_are_degenerate_in_high_dimension() -> None:
    # Why the bandwidths are scaled: with the reference's 10–50 a clear shift is invisible at W = 512.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 512, generator=g), torch.randn(200, 512, generator=g)
    fixed = torch.tensor([20.0, 30.0, 40.0, 100.0])  # exp(-d / (2a)) for a in 10, 15, 20, 50
    shifted = (x + 1.0).requires_grad_(True)
    degenerate = mmd2_rbf(shifted, y, fixed)
    degenerate.backward()
    assert float(degenerate.detach()) < 1e-3 and float(shifted.grad.norm()) < 1e-4
    assert float(mmd2_rbf(x + 1.0, y, prior_bandwidths(y))) > 0.5


def test_gradient_finite_at_zero_distance() -> None:
    x = torch.zeros(4, 16, requires_grad=True)  # every pair at distance 0
    y = torch.zeros(4, 16)
    mmd2_rbf(x, y, torch.tensor([1.0, 2.0])).backward()
    assert torch.isfinite(x.grad).all()
    # A distance through an explicit square root has an infinite derivative there: the defect we avoid.
    z = torch.zeros(4, 16, requires_grad=True)
    (z[:, None] - z[None]).pow(2).sum(-1).sqrt().sum().backward()
    assert not torch.isfinite(z.grad).all()


def test_squared_distances_match_direct_computation() -> None:
    a, b = torch.randn(5, 7), torch.randn(3, 7)
    direct = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(squared_distances(a, b), direct, atol=1e-5, rtol=1e-5)
    assert (squared_distances(a) >= 0).all()


def test_bandwidth_tracks_the_latent_scale() -> None:
    g = torch.Generator().manual_seed(1)
    h1 = prior_bandwidths(torch.randn(4000, 64, generator=g), (1.0,))
    h2 = prior_bandwidths(3 * torch.randn(4000, 64, generator=g), (1.0,))
    assert float(h1) == pytest.approx(2 * 64, rel=0.05)  # 2·tr(I)
    assert float(h2 / h1) == pytest.approx(9, rel=0.05)


def test_single_row_sample_is_finite() -> None:
    x = torch.randn(1, 8, requires_grad=True)
    value = mmd2_rbf(x, torch.randn(50, 8), torch.tensor([16.0]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


def test_prior_kernel_equals_the_two_sample_estimate_on_the_same_draws() -> None:
    from ktl.aligner import PriorKernel

    g = torch.Generator().manual_seed(2)
    y = torch.randn(300, 32, generator=g)
    x = (0.5 * torch.randn(40, 32, generator=g) + 0.3).requires_grad_(True)
    kernel = PriorKernel(y, within_samples=300)
    fast = kernel.mmd2(x, y)
    full = mmd2_rbf(x, y, kernel.bandwidths)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    (g_fast,) = torch.autograd.grad(fast, x)
    (g_full,) = torch.autograd.grad(mmd2_rbf(x, y, kernel.bandwidths), x)
    torch.testing.assert_close(g_fast, g_full)


def test_doubling_ladder_matches_one_exp_per_bandwidth() -> None:
    from ktl.aligner.mmd import is_doubling_ladder, kernel_sum

    assert is_doubling_ladder((0.25, 0.5, 1.0, 2.0, 4.0)) and is_doubling_ladder((4.0, 1.0, 2.0))
    assert not is_doubling_ladder((1.0, 3.0)) and not is_doubling_ladder((1.0,))
    d = (torch.rand(50, 60, dtype=torch.float64) * 40).requires_grad_(True)
    h = torch.tensor([2.5, 5.0, 10.0, 20.0, 40.0], dtype=torch.float64)
    fast, slow = kernel_sum(d, h, doubling=True), kernel_sum(d, h)
    torch.testing.assert_close(fast, slow)
    (g_fast,) = torch.autograd.grad(fast.sum(), d)
    (g_slow,) = torch.autograd.grad(slow.sum(), d)
    torch.testing.assert_close(g_fast, g_slow)


def test_standard_normal_kernel_matches_a_large_prior_sample() -> None:
    from ktl.aligner import PriorKernel

    torch.manual_seed(0)
    dim = 32
    exact = PriorKernel.standard_normal(dim)
    assert exact.exact
    prior = torch.randn(20000, dim)
    sampled = PriorKernel(prior, within_samples=4000)
    torch.testing.assert_close(
        exact.bandwidths, torch.full((5,), 2.0 * dim) * torch.tensor([0.25, 0.5, 1, 2, 4]), rtol=0.03, atol=0
    )
    torch.testing.assert_close(exact.prior_within, sampled.prior_within, rtol=0.03, atol=1e-3)
    for x in (torch.randn(300, dim), torch.randn(300, dim) * 0.3 + 1.0):
        a = float(exact.mmd2(x))
        b = float(PriorKernel(prior, within_samples=4000).mmd2(x, prior[:8000]))
        # the sampled kernel's bandwidths are estimated, so the two agree to a few percent of the scale
        assert abs(a - b) < 0.03 * abs(b) + 0.005
    assert float(exact.mmd2(torch.randn(300, dim) * 0.3 + 1.0)) > 10 * abs(
        float(exact.mmd2(torch.randn(300, dim)))
    )
