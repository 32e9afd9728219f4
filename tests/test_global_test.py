"""The held-out global test set (``data.global_test_size``): no client holds its samples, the same set for
every run seed, and every client scored on it in the last rounds (``global_accuracy`` in metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ktl.config import build_config
from ktl.data import DataConfig, build_federated_data, held_out_split
from ktl.data.synthetic import make_synthetic
from ktl.errors import DataError
from ktl.simulate import run_simulation


def _splits(config: DataConfig, seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    images = make_synthetic(samples_per_class=100, seed=0)  # 1 000 images, 10 classes
    return held_out_split(config, images, None, num_clients=5, seed=seed)


@pytest.mark.parametrize("partition", ["dirichlet", "pathological"])
def test_the_held_out_set_is_disjoint_from_every_clients_train_and_test_indices(partition: str) -> None:
    config = DataConfig(
        dataset="synthetic", partition=partition, alpha=0.5, global_test_size=300, fraction=0.5
    )
    splits, held = _splits(config, seed=3)
    assert held.shape == (300,) and np.unique(held).shape == (300,)
    for train, test in splits:
        assert not set(held) & set(train) and not set(held) & set(test)
    used = np.concatenate([np.concatenate(pair) for pair in splits])
    assert used.shape[0] == round(0.5 * 700)  # fraction applies to what is left after holding out


def test_the_held_out_set_is_the_same_for_every_seed_and_off_changes_nothing() -> None:
    on = DataConfig(dataset="synthetic", global_test_size=200)
    (first, held0), (other, held1) = _splits(on, seed=0), _splits(on, seed=1)
    assert np.array_equal(held0, held1)  # same images for every seed of a scenario
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other, strict=True))  # partitions differ
    off = DataConfig(dataset="synthetic")
    splits, held = _splits(off, seed=0)
    assert held.size == 0 and sum(len(tr) + len(te) for tr, te in splits) == 1000
    data = build_federated_data(off, num_clients=4, seed=0)
    assert data.global_test is None


def test_the_global_test_set_holds_the_held_out_images() -> None:
    data = build_federated_data(DataConfig(dataset="synthetic", global_test_size=250), num_clients=4, seed=0)
    assert data.global_test is not None
    x, y = data.global_test.x, data.global_test.y
    assert x.shape == (250, *data.clients[0].train_x.shape[1:]) and y.shape == (250,)
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and set(y.tolist()) <= set(range(10))


def test_a_held_out_set_that_cannot_be_drawn_is_one_clear_error() -> None:
    with pytest.raises(DataError, match="more than half"):
        _splits(DataConfig(dataset="synthetic", global_test_size=600), seed=0)
    images = make_synthetic(samples_per_class=10, seed=0)
    given = [(np.arange(0, 50), np.arange(50, 100))]
    with pytest.raises(DataError, match="already split per client"):
        held_out_split(DataConfig(global_test_size=10), images, given, num_clients=1, seed=0)
    with pytest.raises(ValueError, match="global_test_size"):
        DataConfig(global_test_size=10**9)  # bounded before it costs memory


def _rows(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_scores_every_client_on_the_global_set_in_its_last_rounds_and_nothing_else_changes(
    tmp_path: Path,
) -> None:
    base = {"rounds": 3, "method": "fedproto", "data": {"global_test_size": 300}}
    last2 = build_config(preset="smoke", overrides={**base, "out": str(tmp_path / "a"),
                                                     "study": {"global_eval_rounds": 2}})  # fmt: skip
    none = build_config(preset="smoke", overrides={**base, "out": str(tmp_path / "b"),
                                                    "study": {"global_eval_rounds": 1}})  # fmt: skip
    run_simulation(last2, progress=False)
    run_simulation(none, progress=False)
    rows = _rows(tmp_path / "a")
    assert [r["global_accuracy"] is None for r in rows] == [True, False, False]
    for r in rows[1:]:
        per_client = r["global_client_accuracy"]
        assert isinstance(per_client, list) and len(per_client) == 4
        assert all(0 <= a <= 1 for a in per_client)  # type: ignore[operator]
        # every client scored on the same 300 images: the weighted mean is the clients' mean
        assert r["global_accuracy"] == pytest.approx(sum(per_client) / 4)  # type: ignore[arg-type]
    # scoring on the held-out set is forward-only: the run's own numbers are the same without it
    other = _rows(tmp_path / "b")
    assert [r["global_accuracy"] is None for r in other] == [True, True, False]
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in other]
    assert rows[-1]["global_client_accuracy"] == other[-1]["global_client_accuracy"]
