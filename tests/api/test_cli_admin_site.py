"""The operator's and a site's command line against a server on loopback: ``ktl admin federation|client|job``
over the SDK, and ``ktl client run --site DIR`` / ``ktl client prototypes`` on a site's own files only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from ktl.api import create_app
from ktl.api.process import ServerThread, free_port
from ktl.cli import main
from ktl.data.synthetic import make_synthetic
from ktl.records import Prototypes
from tests.api.conftest import ADMIN, FAST_ALIGNER, make_settings


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    thread = ServerThread(create_app(make_settings(tmp_path / "data")), "127.0.0.1", free_port()).start()
    yield thread
    thread.stop()


def _site(folder: Path, seed: int, classes: list[int], nested: int | None = None) -> Path:
    """A site's own files as PFLlib writes one client's: uint8 (n, 1, 28, 28) images and labels."""
    pool = make_synthetic(samples_per_class=12, seed=seed)
    keep = np.isin(pool.labels, classes)
    x, y = pool.images[keep], pool.labels[keep]
    folder.mkdir(parents=True)
    if nested is None:
        np.savez(folder / "train.npz", x=x[::2], y=y[::2])
        np.savez(folder / "test.npz", x=x[1::2], y=y[1::2])
    else:  # PFLlib's layout, with this site's files only
        for split, part in (("train", slice(0, None, 2)), ("test", slice(1, None, 2))):
            (folder / split).mkdir()
            np.savez(folder / split / f"{nested}.npz", x=x[part], y=y[part])
    return folder


def _json(capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    return json.loads(capsys.readouterr().out)


def test_admin_cli_and_two_sites_on_their_own_data_run_a_round(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KTL_ADMIN_TOKEN", ADMIN)
    at = ["--url", server.url]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"aligner": FAST_ALIGNER, "class_names": [f"c{i}" for i in range(10)]}))
    assert main(["admin", "federation", "create", *at, "--spec", str(spec), "--num-classes", "10",
                 "--quorum", "2", "--name", "sites"]) == 0  # fmt: skip
    fid = _json(capsys)["id"]
    assert main(["admin", "federation", "list", *at]) == 0
    assert [f["id"] for f in json.loads(capsys.readouterr().out)] == [fid]
    tokens = []
    for name in ("site-a", "site-b"):
        assert main(["admin", "client", "add", *at, fid, "--name", name]) == 0
        tokens.append(_json(capsys)["token"])
    assert main(["admin", "client", "list", *at, fid]) == 0
    assert [c["name"] for c in json.loads(capsys.readouterr().out)] == ["site-a", "site-b"]

    # Site A: its own flat folder; site B: PFLlib's layout holding only its file 3. Neither needs the
    # other's data, nor the preset's.
    site_a = _site(tmp_path / "a", 0, [0, 1, 2, 3])
    site_b = _site(tmp_path / "b", 1, [4, 5, 6], nested=3)
    common = ["--url", server.url, "--federation", fid, "--preset", "smoke"]
    out = tmp_path / "b.safetensors"
    assert main(["client", "prototypes", *common, "--token", tokens[1], "--site", str(site_b),
                 "--client-index", "3", "--out", str(out)]) == 0  # fmt: skip
    uploaded = Prototypes.from_bytes(out.read_bytes())
    assert sorted(uploaded.class_ids.tolist()) == [4, 5, 6]  # its own classes, nobody else's
    assert (
        main(["client", "upload", *common[:4], "--token", tokens[1], "--round", "1", "--file", str(out)]) == 0
    )
    capsys.readouterr()
    assert main(["client", "run", *common, "--token", tokens[0], "--site", str(site_a), "--rounds", "1",
                 "--wait", "120"]) == 0  # fmt: skip
    assert "round 1: local accuracy" in capsys.readouterr().err
    assert main(["admin", "federation", "show", *at, fid]) == 0
    assert _json(capsys)["current_round"] == 2

    # A job over the published round, its result file, then cleanup.
    assert main(["admin", "job", "submit", *at, "--federation", fid, "--round", "1", "--per-class", "2",
                 "--wait", "120"]) == 0  # fmt: skip
    job = _json(capsys)
    assert job["state"] == "done"
    result = tmp_path / "job.safetensors"
    assert main(["admin", "job", "result", *at, job["id"], "--out", str(result)]) == 0
    tensors = load_file(str(result))
    assert sorted(set(tensors["class_ids"].tolist())) == list(range(7)) and tensors["images"].shape[0] == 14
    capsys.readouterr()
    assert main(["admin", "client", "list", *at, fid]) == 0
    clients = json.loads(capsys.readouterr().out)
    assert main(["admin", "client", "remove", *at, fid, clients[0]["client_id"]]) == 0
    assert _json(capsys)["active"] is False


def test_site_and_admin_errors_are_one_line(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KTL_ADMIN_TOKEN", ADMIN)
    assert main(["admin", "federation", "create", "--url", server.url, "--num-classes", "10", "--quorum", "2",
                 "--spec", str(tmp_path / "missing.json")]) == 2  # fmt: skip
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["admin", "federation", "show", "--url", server.url, "fed-nope"]) == 2
    assert capsys.readouterr().err.startswith("ktl: error: server answered 404")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"aligner": FAST_ALIGNER}))
    assert main(["admin", "federation", "create", "--url", server.url, "--spec", str(spec), "--num-classes",
                 "10", "--quorum", "2"]) == 0  # fmt: skip
    fid = _json(capsys)["id"]
    assert main(["admin", "client", "add", "--url", server.url, fid]) == 0
    token = _json(capsys)["token"]
    common = ["--url", server.url, "--federation", fid, "--token", token, "--preset", "smoke"]
    assert main(["client", "run", *common, "--site", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "site folder" in err and "does not exist" in err
    site = _site(tmp_path / "s", 0, [0, 1])
    assert main(["client", "run", *common, "--site", str(site), "--data.fraction", "0.5"]) == 2
    assert "does not apply to --site" in capsys.readouterr().err
    # Quorum 2 and one client: the round never closes; --wait ends in one line, not a traceback.
    assert main(["client", "run", *common, "--site", str(site), "--wait", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ktl: error: gave up waiting: round 1")
