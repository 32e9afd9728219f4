"""``ktl simulate`` gives the per-round numbers the code gave before the methods moved to one protocol.

The values were produced by ktl at commit 18539f5 (before ``ktl.methods`` became a package driven by every
transport), with the same configs, on 2 CPU threads. A change that alters what a method computes — its
training, its payloads, its server step, its noise — changes them; reorganising code must not.
Floating-point figures are compared to 1e-6 relative (a different thread count may reorder reductions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ktl.config import build_config
from ktl.data.fashion_mnist import find_fashion_mnist
from ktl.errors import DataError
from ktl.simulate import run_simulation

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "smoke": ("smoke", {}),
    "smoke-dp": ("smoke", {"privacy": {"epsilon": 8.0}}),
    # cpu-small's data (Fashion-MNIST) and its six-backbone zoo, cut to 2 rounds of 6 clients on 4 %
    "cpu-small": ("cpu-small", {"num_clients": 6, "rounds": 2, "data": {"fraction": 0.04}}),
}

PINNED: dict[str, list[dict[str, float]]] = {
    "smoke/fedktl": [
        {
            "accuracy": 0.6266666666666667,
            "train_loss": 27.40532289248461,
            "distill_loss": 0.0,
            "bytes_up": 2056,
            "bytes_down": 165024,
            "align_loss_last": 0.19035935401916504,
        },
        {
            "accuracy": 0.9626666666666667,
            "train_loss": 6.213095536706043,
            "distill_loss": 1.0526788931841042,
            "bytes_up": 2056,
            "bytes_down": 165024,
            "align_loss_last": 0.11765725910663605,
        },
    ],
    "smoke/fedproto": [
        {
            "accuracy": 0.6266666666666667,
            "train_loss": 27.40532289248461,
            "distill_loss": 0.0,
            "bytes_up": 2056,
            "bytes_down": 2272,
            "classes_in_table": 10.0,
        },
        {
            "accuracy": 0.972,
            "train_loss": 5.992064230065597,
            "distill_loss": 0.640610496830522,
            "bytes_up": 2056,
            "bytes_down": 2272,
            "classes_in_table": 10.0,
        },
    ],
    "smoke/fedtgp": [
        {
            "accuracy": 0.6266666666666667,
            "train_loss": 27.40532289248461,
            "distill_loss": 0.0,
            "bytes_up": 2056,
            "bytes_down": 2272,
            "classes_in_table": 10.0,
        },
        {
            "accuracy": 0.9506666666666667,
            "train_loss": 5.723022886187012,
            "distill_loss": 5.557607305537887,
            "bytes_up": 2056,
            "bytes_down": 2272,
            "classes_in_table": 10.0,
        },
    ],
    "smoke/fd": [
        {
            "accuracy": 0.6266666666666667,
            "train_loss": 27.40532289248461,
            "distill_loss": 0.0,
            "bytes_up": 2056,
            "bytes_down": 2272,
            "classes_in_table": 10.0,
        },
        {
            "accuracy": 0.9693333333333334,
            "train_loss": 6.285403550995721,
            "distill_loss": 0.5278648117829484,
            "bytes_up": 2056,
            "bytes_down": 2272,
            "classes_in_table": 10.0,
        },
    ],
    "smoke-dp/fedktl": [
        {
            "accuracy": 0.6266666666666667,
            "train_loss": 27.40532289248461,
            "distill_loss": 0.0,
            "bytes_up": 2056,
            "bytes_down": 165024,
            "align_loss_last": 0.1816083937883377,
        },
        {
            "accuracy": 0.9666666666666667,
            "train_loss": 6.2825645399372485,
            "distill_loss": 1.0543745942980225,
            "bytes_up": 2056,
            "bytes_down": 165024,
            "align_loss_last": 0.11475107073783875,
        },
    ],
    "smoke-dp/fedproto": [
        {
            "accuracy": 0.6266666666666667,
            "train_loss": 27.40532289248461,
            "distill_loss": 0.0,
            "bytes_up": 2056,
            "bytes_down": 2272,
            "classes_in_table": 10.0,
        },
        {
            "accuracy": 0.968,
            "train_loss": 6.121580349911026,
            "distill_loss": 0.6427287023667007,
            "bytes_up": 2056,
            "bytes_down": 2272,
            "classes_in_table": 10.0,
        },
    ],
    "cpu-small/fedktl": [
        {
            "accuracy": 0.6695278969957081,
            "train_loss": 28.110043056427486,
            "distill_loss": 0.0,
            "bytes_up": 2064,
            "bytes_down": 247536,
            "align_loss_last": 0.20091110467910767,
        },
        {
            "accuracy": 0.7925608011444921,
            "train_loss": 14.410574973575654,
            "distill_loss": 1.1856781116553716,
            "bytes_up": 2064,
            "bytes_down": 247536,
            "align_loss_last": 0.19980360567569733,
        },
    ],
    "cpu-small/fedproto": [
        {
            "accuracy": 0.6695278969957081,
            "train_loss": 28.110043056427486,
            "distill_loss": 0.0,
            "bytes_up": 2064,
            "bytes_down": 3408,
            "classes_in_table": 10.0,
        },
        {
            "accuracy": 0.7625178826895566,
            "train_loss": 13.72089253910004,
            "distill_loss": 0.501184763179885,
            "bytes_up": 2064,
            "bytes_down": 3408,
            "classes_in_table": 10.0,
        },
    ],
}


def _has_fashion_mnist() -> bool:
    try:
        find_fashion_mnist()
    except DataError:
        return False
    return True


@pytest.mark.parametrize("key", sorted(PINNED))
def test_simulate_reproduces_the_pinned_per_round_numbers(tmp_path: Path, key: str) -> None:
    case, method = key.split("/")
    preset, overrides = CASES[case]
    if preset == "cpu-small" and not _has_fashion_mnist():
        pytest.skip("Fashion-MNIST is not installed (make setup installs it as root)")
    torch.manual_seed(1234)  # as the run that produced the values (the suite's autouse seed)
    config = build_config(
        preset=preset, overrides={**overrides, "method": method, "out": str(tmp_path / "r")}
    )
    run_simulation(config, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(PINNED[key])
    for row, pinned in zip(rows, PINNED[key], strict=True):
        for name, value in pinned.items():
            assert row[name] == pytest.approx(value, rel=1e-6, abs=1e-9), (row["round"], name)
