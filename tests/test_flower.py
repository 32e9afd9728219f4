"""ktl on Flower's Simulation Engine: the same method steps as ``ktl simulate``, with client state carried
between rounds in Flower's ``context.state``; with the same seed and full participation the per-round
accuracies equal simulate's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ktl.config import build_config
from ktl.flower.config import FlowerOptions, from_run_config, to_run_config
from ktl.flower.simulation import run_flower_simulation
from ktl.study import miss_reason
from tests.conftest import simulate_like_ray
from tests.run_folders import assert_same_run_folders


def test_the_run_config_round_trips_to_the_same_configuration() -> None:
    config = build_config(preset="cpu-small", overrides={"method": "fedproto", "privacy": {"epsilon": 4.0}})
    again, options = from_run_config(to_run_config(config, FlowerOptions(fraction=0.5)))
    assert again.model_dump(exclude={"preset", "out"}) == config.model_dump(exclude={"preset", "out"})
    assert options.fraction == 0.5
    via_settings, _ = from_run_config({"preset": "smoke", "settings": "client.lr=0.2 models=cnn4,resnet-s"})
    assert via_settings.client.lr == 0.2 and via_settings.models == ["cnn4", "resnet-s"]
    with pytest.raises(Exception, match="unknown run-config key"):
        from_run_config({"clients.lr": 0.1})


@pytest.mark.parametrize(
    "method",
    [
        # fedktl against simulate runs in make test on the in-memory Grid (tests/test_runner.py); on Ray it
        # is one more Ray start-up for the same transport: make test-all
        pytest.param("fedktl", marks=pytest.mark.slow),
        # fedproto crosses Flower in make test on the SecAgg+ test and the Deployment Engine's worker test
        pytest.param("fedproto", marks=pytest.mark.slow),
        "lg-fedavg",  # a weights payload (the trainable classifier), kept fast
        # the other HtFLlib baselines: their client state (shared model, generator) crosses Flower rounds
        *(pytest.param(m, marks=pytest.mark.slow) for m in ("fedgh", "fedgen", "fml", "fedkd", "fedmrl")),
    ],
)
def test_flower_simulation_gives_the_per_round_accuracies_of_ktl_simulate(
    tmp_path: Path, method: str
) -> None:
    overrides = {"method": method, "num_clients": 3, "rounds": 2, "aligner": {"steps": 20}}
    torch.manual_seed(1234)
    simulated = simulate_like_ray(
        build_config(preset="smoke", overrides={**overrides, "out": str(tmp_path / "sim")})
    )
    lines = [json.loads(x) for x in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()]
    config = build_config(preset="smoke", overrides=overrides)
    flower = run_flower_simulation(config, FlowerOptions(out=str(tmp_path / "flower")))
    assert flower["accuracy"] == [x["accuracy"] for x in lines]
    assert flower["final_accuracy"] == simulated["final_accuracy"] and flower["failures"] == 0
    rows = [json.loads(x) for x in (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bytes_up"] for r in rows] == [x["bytes_up"] for x in lines]  # the same payload bytes
    # one run folder whichever transport (client weights stay on the nodes)
    assert_same_run_folders(tmp_path / "sim", tmp_path / "flower", clients=False)


@pytest.mark.slow  # make test-all (make test keeps the runner's sampling tests, which every transport shares)
def test_partial_participation_samples_the_same_nodes_for_the_same_seed(tmp_path: Path) -> None:
    """study.join_ratio (as in ktl simulate): each round trains a seeded sample of the nodes; the rest keep
    their state. A sampled client that drops out (study.dropout: the same seeded draw per partition and
    round as ktl simulate) answers without training. flower.fraction is an alias of the join ratio."""
    study = {"join_ratio": 0.75, "dropout": 0.6}
    overrides = {"method": "fedproto", "num_clients": 4, "rounds": 2, "study": study}
    config = build_config(preset="smoke", overrides=overrides)
    summary = run_flower_simulation(config, FlowerOptions(out=str(tmp_path / "part")))
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["participants"]) for r in rows] == [3, 3]
    assert [r["trained"] + len(r["missed"]) for r in rows] == [3, 3]
    # with seed 0, partitions {0, 3} miss round 1 and {1, 3} round 2: exactly those of them chosen miss
    dropping = [
        {i for i in range(4) if miss_reason(config.study, 0, r, i, num_train=1, epochs=1)} for r in (1, 2)
    ]
    assert dropping == [{0, 3}, {1, 3}]
    for row, drop in zip(rows, dropping, strict=True):
        assert {int(cid.split("-")[1]) for cid in row["missed"]} == set(row["participants"]) & drop
        assert set(row["missed"].values()) == {"dropout"}
        assert None not in row["client_accuracy"]  # every client scored, as in ktl simulate
    assert summary["failures"] == 0 and all(0 <= a <= 1 for a in summary["accuracy"])
    alias = from_run_config(to_run_config(config, FlowerOptions(fraction=0.5)))
    assert alias[1].fraction == 0.5 and alias[0].study.join_ratio == 0.75
