import math

import pytest
import torch

from ktl.clients import simplex_etf


@pytest.mark.parametrize(("c", "k"), [(2, 2), (10, 10), (100, 100), (10, 16)])
def test_columns_unit_norm_and_equiangular(c: int, k: int) -> None:
    etf = simplex_etf(c, k, seed=3).double()
    assert etf.shape == (k, c)
    norms = etf.norm(dim=0)
    torch.testing.assert_close(norms, torch.ones(c, dtype=torch.float64), atol=1e-5, rtol=0)
    gram = etf.T @ etf
    off = gram[~torch.eye(c, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1.0 / (c - 1)), atol=1e-5, rtol=0)


def test_same_seed_same_matrix_other_seed_differs() -> None:
    a, b, c = simplex_etf(10, seed=7), simplex_etf(10, seed=7), simplex_etf(10, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_columns_sum_to_zero_maximal_separation() -> None:
    etf = simplex_etf(10, seed=0)
    torch.testing.assert_close(etf.sum(dim=1), torch.zeros(10), atol=1e-5, rtol=0)
    angle = math.degrees(math.acos(-1 / 9))
    assert angle > 90


@pytest.mark.parametrize(("c", "k"), [(1, 1), (10, 5)])
def test_invalid_shapes_raise(c: int, k: int) -> None:
    with pytest.raises(ValueError):
        simplex_etf(c, k)
