"""``ktl client …`` against a server on loopback, and ``ktl demo`` end to end (tiny)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from ktl.api import create_app
from ktl.api.process import ServerThread, free_port
from ktl.cli import main
from ktl.clients.sdk import KtlHttpClient
from ktl.config import build_config
from ktl.demo import SERVER_FOLDER, DemoOptions, run_demo
from ktl.records import Pairs
from ktl.simulate import run_simulation
from tests.api.conftest import ADMIN, FAST_ALIGNER, make_settings, protos
from tests.run_folders import assert_same_run_folders


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    thread = ServerThread(create_app(make_settings(tmp_path / "data")), "127.0.0.1", free_port()).start()
    yield thread
    thread.stop()


def test_client_commands(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    admin = KtlHttpClient(server.url, ADMIN)
    fed = admin.create_federation({"num_classes": 10, "quorum": 1, "aligner": FAST_ALIGNER})
    token = admin.register_client(fed["id"], "cli")["token"]
    common = ["--url", server.url, "--federation", fed["id"]]
    monkeypatch.setenv("KTL_TOKEN", token)
    assert main(["client", "status", *common]) == 0
    assert json.loads(capsys.readouterr().out)["current_round"] == 1
    file = tmp_path / "p.safetensors"
    file.write_bytes(protos([1, 2]).to_bytes(torch.float16))
    assert main(["client", "upload", *common, "--round", "1", "--file", str(file)]) == 0
    assert json.loads(capsys.readouterr().out)["uploads"] == 1
    KtlHttpClient(server.url, token).wait_for_round(fed["id"], 1, timeout=60)
    assert main(["client", "status", *common, "--round", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "published"
    out, png = tmp_path / "pairs.safetensors", tmp_path / "pairs.png"
    assert main(["client", "pairs", *common, "--round", "1", "--out", str(out), "--png", str(png)]) == 0
    assert Pairs.from_bytes(out.read_bytes()).class_ids.tolist() == [1, 2]
    assert png.read_bytes()[:4] == b"\x89PNG"
    # Errors are one line: a refused upload, a bad token, an unreachable server.
    capsys.readouterr()
    assert (
        main(["client", "upload", *common, "--round", "1", "--file", str(file)]) == 0
    )  # identical: idempotent
    capsys.readouterr()
    file.write_bytes(protos([3]).to_bytes())
    assert main(["client", "upload", *common, "--round", "1", "--file", str(file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ktl: error: server answered 409 conflicting_upload")
    assert main(["client", "status", *common, "--token", "wrong"]) == 2
    assert "401 bad_token" in capsys.readouterr().err
    monkeypatch.delenv("KTL_TOKEN")
    assert main(["client", "status", *common]) == 2
    assert "no token" in capsys.readouterr().err


def test_client_run_participates_in_rounds(server: ServerThread, capsys) -> None:
    admin = KtlHttpClient(server.url, ADMIN)
    fed = admin.create_federation({"num_classes": 10, "quorum": 1, "aligner": FAST_ALIGNER})
    token = admin.register_client(fed["id"])["token"]
    code = main(
        [
            "client",
            "run",
            "--url",
            server.url,
            "--federation",
            fed["id"],
            "--token",
            token,
            "--client-index",
            "1",
            "--rounds",
            "2",
            "--preset",
            "smoke",
            "--wait",
            "120",
        ]
    )
    assert code == 0
    assert (
        admin.round(fed["id"], 1)["state"] == "published"
        and admin.round(fed["id"], 2)["state"] == "published"
    )
    assert "round 2: local accuracy" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("fedktl", {}),
        # fedproto and DP over HTTP: make test-all (make test keeps DP over HTTP in test_methods_over_http)
        pytest.param("fedproto", {}, marks=pytest.mark.slow),
        pytest.param("fedproto", {"privacy": {"epsilon": 8.0}}, marks=pytest.mark.slow),
        ("lg-fedavg", {}),
        *(pytest.param(m, {}, marks=pytest.mark.slow) for m in ("fedgh", "fedgen", "fml", "fedkd", "fedmrl")),
    ],
    ids=["fedktl", "fedproto", "fedproto-dp", "lg-fedavg", "fedgh", "fedgen", "fml", "fedkd", "fedmrl"],
)
def test_demo_over_http_gives_the_per_round_accuracies_of_simulate(
    tmp_path: Path, method: str, overrides: dict[str, object]
) -> None:
    """Parity: the same method steps, driven over HTTP by the demo and in one loop by simulate, with the
    same seed, clients and rounds, give the same accuracies (exactly: nothing is re-implemented)."""
    torch.manual_seed(1234)
    result = run_demo(
        DemoOptions(
            rounds=2, clients=3, preset="smoke", out=tmp_path / "demo", method=method, overrides=overrides
        )
    )
    torch.manual_seed(1234)
    config = build_config(
        preset="smoke",
        overrides={
            **overrides,
            "method": method,
            "num_clients": 3,
            "rounds": 2,
            "out": str(tmp_path / "sim"),
        },
    )
    run_simulation(config, progress=False)
    simulated = [
        json.loads(x)["accuracy"] for x in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()
    ]
    assert result["accuracy"] == simulated and len(simulated) == 2
    assert_same_run_folders(tmp_path / "demo", tmp_path / "sim")  # one run folder, whichever transport
    assert (tmp_path / "demo" / SERVER_FOLDER / "federations").is_dir()  # the server's own state beside it
    assert str(result["url"]).startswith("http://127.0.0.1:")
    if method == "fedktl":
        assert Path(str(result["grid"])).read_bytes()[:4] == b"\x89PNG"
    if overrides:  # the federation carries the budget and accounts what the clients spent
        privacy = result["privacy"]
        assert isinstance(privacy, dict) and privacy["epsilon"] == 8.0 and privacy["rounds"] == 2
        assert privacy["epsilon_spent"] == pytest.approx(8.0)


def test_demo_refuses_a_method_that_exchanges_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--method", "local", "--rounds", "1", "--clients", "1", "--preset", "smoke"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "exchanges nothing" in err


def test_client_run_refuses_settings_that_are_the_federations(server: ServerThread, capsys) -> None:
    admin = KtlHttpClient(server.url, ADMIN)
    fed = admin.create_federation({"num_classes": 10, "quorum": 1, "aligner": FAST_ALIGNER})
    token = admin.register_client(fed["id"])["token"]
    common = ["client", "run", "--url", server.url, "--federation", fed["id"], "--token", token]
    common += ["--client-index", "0", "--preset", "smoke"]
    for flags, words in [
        (["--privacy.epsilon", "8"], "privacy.epsilon is the federation's setting"),
        (["--method", "fedproto"], "runs method 'fedktl', not 'fedproto'"),
        (["--baseline.lam", "2"], "do not apply to method 'fedktl'"),
        (["--fedktl.mu", "3"], "fedktl.mu is the federation's setting"),
    ]:
        assert main([*common, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err, err
    assert admin.round(fed["id"], 1)["uploads"] == 0  # nothing was sent
    assert (
        main([*common, "--fedktl.mu", "1.0", "--rounds", "1", "--wait", "120"]) == 0
    )  # the same value: fine


def test_demo_falls_back_to_synthetic_data_with_a_notice(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("KTL_DATA_DIR", str(tmp_path / "no-data-here"))
    with caplog.at_level(logging.WARNING, logger="ktl.demo"):
        result = run_demo(DemoOptions(rounds=1, clients=2, preset="cpu-small", out=tmp_path / "demo"))
    assert any("SYNTHETIC" in r.getMessage() for r in caplog.records)
    assert any("dataset-fashion-mnist" in r.getMessage() for r in caplog.records)
    assert len(result["accuracy"]) == 1  # type: ignore[arg-type]


def test_demo_in_a_relative_run_folder_publishes_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make demo` runs in runs/demo-<time>, a relative folder: the server's data folder is relative too.
    Its stored files were once recorded under one key and read under another (every round failed with
    corrupt_file while the demo still reported local accuracies); now a failed round fails the demo."""
    monkeypatch.chdir(tmp_path)
    result = run_demo(DemoOptions(rounds=2, clients=2, preset="smoke", out=Path("runs") / "demo"))
    assert len(result["accuracy"]) == 2 and result["failures"] == 0  # type: ignore[arg-type]
    lines = [json.loads(x) for x in (tmp_path / "runs/demo/metrics.jsonl").read_text().splitlines()]
    assert [line["missed"] for line in lines] == [{}, {}] and (tmp_path / "runs/demo/pairs.png").is_file()
