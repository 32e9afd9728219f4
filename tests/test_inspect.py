"""The notebook helpers in ktl.inspect."""

from __future__ import annotations

import torch

from ktl import inspect as ki
from ktl.records import Pairs


def test_pca_2d_keeps_the_direction_of_largest_spread() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g) * torch.tensor([10.0, 5.0] + [0.1] * 6)
    (p,) = ki.pca_2d(x)
    assert p.shape == (200, 2)
    assert p[:, 0].var() > p[:, 1].var() > 10 * x[:, 2:].var(0).max()


def test_lift_linearly_preserves_geometry_and_matches_prior_norms() -> None:
    v = torch.nn.functional.normalize(torch.randn(5, 10), dim=1)
    z = ki.lift_linearly(v, 256, seed=3)
    assert z.shape == (5, 256)
    torch.testing.assert_close(z.norm(dim=1), torch.full((5,), 16.0))  # sqrt(256)
    torch.testing.assert_close(z @ z.T / 256, v @ v.T, atol=1e-5, rtol=0)  # angles kept
    torch.testing.assert_close(ki.lift_linearly(v, 256, seed=3), z)


def test_nearest_images_finds_the_copy_and_handles_size_and_channels() -> None:
    bank = torch.rand(20, 3, 16, 16)
    assert ki.nearest_images(bank[[7, 2]], bank).tolist() == [7, 2]
    big = torch.nn.functional.interpolate(bank[[5]], size=32, mode="nearest")
    assert ki.nearest_images(big, bank).tolist() == [5]


def test_distinctness_is_zero_for_copies_and_grows_with_difference() -> None:
    same = torch.full((3, 1, 4, 4), 0.5)
    assert ki.distinctness(same) == 0.0
    apart = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    assert abs(ki.distinctness(apart) - 1.0) < 1e-6


def test_class_images_over_rounds_is_class_major_with_blanks_for_missing_classes() -> None:
    def pairs(classes: list[int], value: float) -> Pairs:
        m = len(classes)
        return Pairs(torch.full((m, 3, 2, 2), value), torch.zeros(m, 4), torch.tensor(classes))

    tiles, labels = ki.class_images_over_rounds({1: pairs([0, 1], 0.1), 2: pairs([1], 0.2)}, 2)
    assert labels == ["c0 r1", "c0 r2", "c1 r1", "c1 r2"]
    means = torch.stack([t.mean() for t in tiles])
    torch.testing.assert_close(means, torch.tensor([0.1, 1.0, 0.1, 0.2]))  # 1.0: class 0 blank in round 2
