"""Study controls (``ktl.study``, the ``study`` section and ``client.lr_schedule``): participation,
dropout, stragglers, learning-rate schedules, evaluation every k rounds, early stop, pretrained client
weights, repeats — and partial participation under the HTTP server's quorum."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from ktl.api import create_app
from ktl.cli import main
from ktl.clients import simplex_etf
from ktl.clients.sdk import KtlHttpClient
from ktl.clients.trainer import scheduled_lr
from ktl.config import SimulateConfig, build_config
from ktl.data import build_federated_data
from ktl.errors import ConfigError
from ktl.simulate import build_client, run_repeats, run_simulation
from ktl.study import StudySettings, miss_reason, participants
from tests.api.conftest import ADMIN, FAST_ALIGNER, make_settings, protos


def _config(tmp_path: Path, name: str, **overrides: Any) -> SimulateConfig:
    """The smoke preset with the cheapest method (training alone), into ``tmp_path/name``."""
    base: dict[str, Any] = {"method": "local", "out": str(tmp_path / name)}
    return build_config(preset="smoke", overrides={**base, **overrides})


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# -- participation ---------------------------------------------------------------------------------


def test_participants_are_a_seeded_sample_of_the_configured_size() -> None:
    half = StudySettings(join_ratio=0.5)
    rounds = [participants(half, 7, r, 10) for r in range(1, 21)]
    assert all(len(p) == 5 and p == sorted(set(p)) and all(0 <= i < 10 for i in p) for p in rounds)
    assert rounds == [participants(half, 7, r, 10) for r in range(1, 21)]  # same seed, same clients
    assert len({tuple(p) for p in rounds}) > 1  # the sample changes across rounds
    assert rounds != [participants(half, 8, r, 10) for r in range(1, 21)]  # another seed, another draw
    assert participants(StudySettings(), 0, 1, 4) == [0, 1, 2, 3]  # the default: everyone
    assert len(participants(StudySettings(join_ratio=0.1, min_clients=3), 0, 1, 10)) == 3
    assert participants(StudySettings(join_ratio=0.1, min_clients=9), 0, 1, 4) == [0, 1, 2, 3]


def test_only_participants_train_and_everyone_is_evaluated(tmp_path: Path) -> None:
    config = _config(tmp_path, "half", rounds=1, study={"join_ratio": 0.5})
    run_simulation(config, progress=False)
    (row,) = _metrics(tmp_path / "half")
    chosen = participants(config.study, config.seed, 1, 4)
    assert row["participants"] == chosen and row["trained"] == 2
    assert len(row["client_accuracy"]) == 4 and row["evaluated"] is True
    data = build_federated_data(config.data, num_clients=4, seed=config.seed)
    etf = simplex_etf(data.num_classes, data.num_classes, seed=config.etf_seed)
    for index in range(4):
        fresh = build_client(config, data, index, etf, torch.device("cpu")).model.state_dict()
        saved = _weights(
            tmp_path / "half" / "clients" / f"client-{index:02d}-{config.models[index % 2]}.safetensors"
        )
        unchanged = all(torch.equal(saved[k], fresh[k]) for k in saved)
        assert unchanged == (index not in chosen), index  # a client that did not train kept its weights


# -- dropout and stragglers --------------------------------------------------------------------------


def test_dropout_and_stragglers_are_seeded_draws() -> None:
    study = StudySettings(dropout=0.5)
    fates = [miss_reason(study, 3, r, i, num_train=100, epochs=1) for r in range(1, 11) for i in range(8)]
    assert fates == [
        miss_reason(study, 3, r, i, num_train=100, epochs=1) for r in range(1, 11) for i in range(8)
    ]
    assert set(fates) == {"dropout", None}
    assert miss_reason(StudySettings(), 3, 1, 0, num_train=10**9, epochs=9) is None  # the default: none

    # speed 1 everywhere: 2 epochs × 100 samples × 0.01 s = 2 s, against budgets of 1.9 s and 2.1 s
    steady = {"speed_sigma": 0.0, "seconds_per_sample": 0.01}
    slow = StudySettings(round_budget=1.9, **steady)
    fast = StudySettings(round_budget=2.1, **steady)
    assert miss_reason(slow, 0, 1, 0, num_train=100, epochs=2) == "straggler"
    assert miss_reason(fast, 0, 1, 0, num_train=100, epochs=2) is None
    spread = StudySettings(round_budget=1.0, seconds_per_sample=0.01, speed_sigma=1.0)
    draws = [miss_reason(spread, 0, r, i, num_train=100, epochs=1) for r in range(1, 6) for i in range(8)]
    assert set(draws) == {"straggler", None}  # the median device makes it just in time: some do, some not


def test_simulate_drops_the_clients_the_draws_say(tmp_path: Path) -> None:
    config = _config(tmp_path, "drop", rounds=2, study={"dropout": 0.4, "round_budget": 0.4})
    run_simulation(config, progress=False)
    data = build_federated_data(config.data, num_clients=4, seed=config.seed)
    names = [f"client-{i:02d}-{config.models[i % 2]}" for i in range(4)]
    expected = [
        {
            names[i]: reason
            for i in range(4)
            if (
                reason := miss_reason(config.study, 0, r, i, num_train=len(data.clients[i].train_y), epochs=1)
            )
        }
        for r in (1, 2)
    ]
    rows = _metrics(tmp_path / "drop")
    assert [row["missed"] for row in rows] == expected
    assert any(expected) and [row["trained"] for row in rows] == [4 - len(m) for m in expected]


# -- learning-rate schedules -----------------------------------------------------------------------


def test_step_decay_is_used_and_recorded_per_round(tmp_path: Path) -> None:
    client = {"lr": 0.05, "lr_schedule": "step", "lr_gamma": 0.5, "lr_step_rounds": 1}
    config = _config(tmp_path, "step", rounds=3, client=client)
    run_simulation(config, progress=False)
    assert [row["lr"] for row in _metrics(tmp_path / "step")] == pytest.approx([0.05, 0.025, 0.0125])


def test_cosine_and_step_schedules() -> None:
    cosine = build_config(overrides={"client": {"lr": 0.1, "lr_schedule": "cosine"}}).client
    lrs = [scheduled_lr(cosine, r, 5) for r in range(1, 6)]
    assert lrs[0] == 0.1 and all(a > b > 0 for a, b in zip(lrs, lrs[1:], strict=False))
    step = build_config(overrides={"client": {"lr_schedule": "step", "lr_step_rounds": 2}}).client
    assert [scheduled_lr(step, r) for r in (1, 2, 3)] == pytest.approx([0.01, 0.01, 0.001])
    with pytest.raises(ConfigError, match="lr_rounds"):
        scheduled_lr(cosine, 1, None)  # a client of a server does not know the run's length
    with pytest.raises(ConfigError, match="unknown lr schedule"):
        build_config(overrides={"client": {"lr_schedule": "linear"}})


# -- evaluation and early stop ---------------------------------------------------------------------


def test_eval_every_k_skips_evaluations_but_not_the_last_round(tmp_path: Path) -> None:
    summary = run_simulation(_config(tmp_path, "every", rounds=3, study={"eval_every": 2}), progress=False)
    rows = _metrics(tmp_path / "every")
    assert [row["evaluated"] for row in rows] == [False, True, True]
    assert rows[0]["accuracy"] is None and all(0 <= row["accuracy"] <= 1 for row in rows[1:])
    assert summary["final_accuracy"] == rows[2]["accuracy"] and summary["best_round"] in (2, 3)


def test_early_stop_on_a_plateau_ends_the_run(tmp_path: Path) -> None:
    # A gain above 1.0 is impossible: the first evaluated round sets the best, the next is stale.
    study = {"patience": 1, "min_delta": 1.0}
    summary = run_simulation(_config(tmp_path, "stop", rounds=4, study=study), progress=False)
    assert len(_metrics(tmp_path / "stop")) == 2
    assert summary["rounds_run"] == 2 and summary["stopped_early"]["round"] == 2
    assert "1 evaluated rounds" in summary["stopped_early"]["reason"]
    assert json.loads((tmp_path / "stop" / "summary.json").read_text())["stopped_early"]["round"] == 2


# -- pretrained client weights ---------------------------------------------------------------------


def test_clients_start_from_the_weights_of_an_earlier_run(tmp_path: Path) -> None:
    run_simulation(_config(tmp_path, "first", rounds=1), progress=False)
    config = _config(tmp_path, "second", rounds=1, study={"pretrained": str(tmp_path / "first")})
    data = build_federated_data(config.data, num_clients=4, seed=config.seed)
    etf = simplex_etf(data.num_classes, data.num_classes, seed=config.etf_seed)
    for index in (0, 1):
        client = build_client(config, data, index, etf, torch.device("cpu"))
        saved = _weights(tmp_path / "first" / "clients" / f"{client.client_id}.safetensors")
        state = client.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items())
    # the clients/ folder itself works too
    clients = config.study.model_copy(update={"pretrained": tmp_path / "first" / "clients"})
    build_client(config.model_copy(update={"study": clients}), data, 2, etf, torch.device("cpu"))


def test_wrong_pretrained_weights_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--preset", "smoke", "--no-progress", "--study.pretrained", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "ktl: error:" in err and "no weights for client-00" in err
    run_simulation(_config(tmp_path, "first", rounds=1), progress=False)
    target = tmp_path / "first" / "clients" / "client-00-cnn4.safetensors"
    weights = _weights(target)
    name = next(iter(weights))
    save_file({**weights, name: torch.zeros(3, 3)}, str(target))
    config = _config(tmp_path, "second", study={"pretrained": str(tmp_path / "first")})
    with pytest.raises(ConfigError, match=f"{name} has shape"):
        run_simulation(config, progress=False)


# -- repeats ---------------------------------------------------------------------------------------


def test_repeats_run_each_seed_and_report_mean_and_std(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rep"
    argv = ["simulate", "--preset", "smoke", "--method", "local", "--rounds", "1", "--no-progress"]
    code = main([*argv, "--seed", "3", "--repeats", "2", "--out", str(out)])
    assert code == 0 and "2 seeds (3…4): final accuracy" in capsys.readouterr().out
    top = json.loads((out / "summary.json").read_text())
    runs = [json.loads((out / f"seed-{s}" / "summary.json").read_text()) for s in (3, 4)]
    assert top["seeds"] == [3, 4] and [r["seed"] for r in runs] == [3, 4]
    finals = [r["final_accuracy"] for r in runs]
    assert top["final_accuracy"]["values"] == finals
    assert top["final_accuracy"]["mean"] == pytest.approx(sum(finals) / 2)
    assert top["final_accuracy"]["std"] == pytest.approx(abs(finals[0] - finals[1]) / 2)
    assert top["best_accuracy"]["mean"] >= top["final_accuracy"]["mean"]
    with pytest.raises(ConfigError, match="already exists"):  # the top folder is refused like a run's
        run_repeats(build_config(preset="smoke", overrides={"out": str(out), "study": {"repeats": 2}}))


# -- the HTTP server: partial participation meets the quorum ---------------------------------------


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[tuple[KtlHttpClient, TestClient]]:
    with TestClient(create_app(make_settings(tmp_path / "data"))) as http:
        yield KtlHttpClient("", ADMIN, http=http, retries=0), http


def test_a_quorum_of_two_publishes_when_two_of_four_clients_upload(
    admin: tuple[KtlHttpClient, TestClient],
) -> None:
    sdk, http = admin
    fid = sdk.create_federation({"num_classes": 10, "quorum": 2, "aligner": FAST_ALIGNER, "etf_seed": 0})[
        "id"
    ]
    clients = [
        KtlHttpClient("", sdk.register_client(fid, f"c{i}")["token"], http=http, retries=0) for i in range(4)
    ]
    for r in (1, 2):  # each round a different half of the federation takes part
        a, b = (clients[0], clients[2]) if r == 1 else (clients[1], clients[3])
        a.upload(fid, r, protos([0, 1, 2], seed=r))
        b.upload(fid, r, protos([3, 4], seed=r + 10))
        state = a.wait_for_round(fid, r, timeout=60)
        assert state["state"] == "published" and state["uploads"] == 2
        assert len(clients[3].pairs(fid, r)) == 5  # a client that did not upload still gets the broadcast
