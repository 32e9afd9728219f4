"""Integrity and storage: checksums verified on every read, damaged state skipped, database trouble refused
with one line, ``ktl admin check [--repair]``, a full disk answered 507, refused uploads leave nothing."""

from __future__ import annotations

import errno
import http.client
import json
import logging
import os
import shutil
import sqlite3
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

import ktl.api.store as store_module
from ktl.api import create_app
from ktl.api.process import ServerThread, free_port
from ktl.api.schemas import FederationSpec
from ktl.api.service import KtlService
from ktl.api.services.rounds import cancel_rule, quorum_rule
from ktl.api.store import Store
from ktl.api.worker import ROUND_PRIORITY
from ktl.cli import main
from ktl.clients.sdk import KtlHttpClient
from ktl.errors import ConfigError, ConflictError, CorruptFileError, InsufficientStorageError
from tests.api.conftest import ADMIN, auth, federation, make_settings, octet, protos, register

UPLOAD = "/v1/federations/{fid}/rounds/{r}/prototypes"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


class Servers:
    """In-process servers on one data folder, one at a time: `start` stops the running one first (a
    restart); `stop` stops it (e.g. before ``ktl admin check``)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.running: TestClient | None = None

    def start(self, **overrides: Any) -> tuple[TestClient, KtlService, KtlHttpClient]:
        self.stop()
        app = create_app(make_settings(self.data_dir, **overrides))
        client = TestClient(app)
        client.__enter__()
        self.running = client
        return client, app.state.service, KtlHttpClient("", ADMIN, http=client, retries=0)

    def stop(self) -> None:
        if self.running is not None:
            self.running.__exit__(None, None, None)
            self.running = None


@pytest.fixture
def servers(data_dir: Path) -> Iterator[Servers]:
    s = Servers(data_dir)
    yield s
    s.stop()


def wait_round(client: KtlHttpClient, fid: str, r: int, states: tuple[str, ...] = ("published", "failed"),
               timeout: float = 30) -> dict[str, Any]:  # fmt: skip
    deadline = time.monotonic() + timeout
    while (state := client.round(fid, r))["state"] not in states:
        assert time.monotonic() < deadline, state
        time.sleep(0.02)
    return state


def publish(client: KtlHttpClient, fid: str, r: int, seed: int = 0) -> dict[str, Any]:
    client.upload(fid, r, protos([0, 1, 2, 3], seed=seed))
    state = wait_round(client, fid, r)
    assert state["state"] == "published", state
    return state


def damage_snapshot(service: KtlService, fid: str, r: int) -> Path:
    """Overwrite the header of the snapshot's largest safetensors file: loading it says 'header too large'."""
    biggest = max(service.store.state_dir(fid, r).rglob("*.safetensors"), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)
    biggest.write_bytes(bytes(data))
    return biggest


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture(autouse=True)
def _keep_ktl_logging() -> Iterator[None]:
    """`main` points the "ktl" logger at the test's (captured, later closed) stderr: undo that."""
    logger = logging.getLogger("ktl")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


# -- damaged files ------------------------------------------------------------------------------------------


def test_a_damaged_latest_snapshot_falls_back_to_the_one_before_and_the_round_publishes(
    servers: Servers,
) -> None:
    http, service, admin = servers.start()
    fed = federation(admin, quorum=1)
    fid = fed["id"]
    (a,) = register(admin, http, fid, 1)
    token = a._headers["Authorization"].split()[1]
    publish(a, fid, 1)
    publish(a, fid, 2, seed=1)
    assert "state_fallback" not in admin.round(fid, 2)["stats"]  # round 2 started warm from round 1
    damage_snapshot(service, fid, 2)
    assert "SHA-256" in str(service.store.snapshot_problem(fid, 2))

    http, service, admin = servers.start()  # a restart: the method is loaded from the snapshots on disk
    a = KtlHttpClient("", token, http=http, retries=0)
    stats = publish(a, fid, 3, seed=2)["stats"]
    fallback = stats["state_fallback"]
    assert fallback["restored_from_round"] == 1
    assert [s["round"] for s in fallback["skipped"]] == [2]
    assert (
        ".safetensors" in fallback["skipped"][0]["reason"] and "SHA-256" in fallback["skipped"][0]["reason"]
    )

    # Every snapshot damaged: the round still publishes, from a fresh method, and says so.
    for r in service.store.state_snapshots(fid):
        damage_snapshot(service, fid, r)
    http, service, admin = servers.start()
    a = KtlHttpClient("", token, http=http, retries=0)
    fallback = publish(a, fid, 4, seed=3)["stats"]["state_fallback"]
    assert fallback["restored_from_round"] is None and len(fallback["skipped"]) == 2


def test_damaged_published_files_and_job_results_answer_corrupt_file_never_their_bytes(
    servers: Servers,
) -> None:
    http, service, admin = servers.start()
    fed = federation(admin, quorum=1)
    fid = fed["id"]
    (a,) = register(admin, http, fid, 1)
    publish(a, fid, 1)
    folder = service.store.round_dir(fid, 1)

    pairs = folder / "pairs.safetensors"
    truncated = pairs.read_bytes()[:100]
    pairs.write_bytes(truncated)
    for path in (f"/v1/federations/{fid}/rounds/1/pairs", f"/v1/federations/{fid}/rounds/1/broadcast"):
        response = http.get(path, headers=a._headers)
        assert response.status_code == 500 and response.headers["content-type"] == "application/json"
        assert truncated not in response.content
        error = response.json()["error"]
        assert error["reason"] == "corrupt_file", error
        assert "pairs.safetensors" in error["message"] and f"federation {fid} round 1" in error["message"]
    assert http.get(f"/v1/federations/{fid}/rounds/1/pairs.png", headers=a._headers).status_code == 200

    centroids = folder / "centroids.safetensors"
    data = bytearray(centroids.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte different
    centroids.write_bytes(bytes(data))
    response = http.post("/v1/jobs", json={"federation_id": fid}, headers=auth(ADMIN))
    assert response.status_code == 500 and response.json()["error"]["reason"] == "corrupt_file"
    assert "centroids.safetensors" in response.json()["error"]["message"]

    job = admin.submit_job({"latents": torch.randn(2, 256).tolist()})
    assert admin.wait_for_job(job["id"], timeout=30, poll=0.05)["state"] == "done"
    result = service.store.job_result_path(job["id"])
    assert service.store.file_record(result) is not None  # recorded when the job finished
    assert admin.job_result(job["id"])["images"].shape[0] == 2
    result.write_bytes(result.read_bytes()[:-10])
    response = http.get(f"/v1/jobs/{job['id']}/result", headers=auth(ADMIN))
    assert response.status_code == 500 and response.json()["error"]["reason"] == "corrupt_file"
    assert job["id"] in response.json()["error"]["message"]


def test_a_damaged_upload_fails_its_round_naming_the_upload(servers: Servers) -> None:
    http, service, admin = servers.start()
    fed = federation(admin, quorum=2)
    fid = fed["id"]
    a, b = register(admin, http, fid, 2)
    release = threading.Event()
    service.worker.submit(ROUND_PRIORITY, lambda: release.wait(30) and None)  # hold the server step
    a.upload(fid, 1, protos([0, 1]))
    b.upload(fid, 1, protos([2, 3], seed=1))
    victim = service.store.upload_path(fid, 1, service.store.list_clients(fid)[0].id)
    victim.write_bytes(victim.read_bytes()[:-4])
    release.set()
    state = wait_round(a, fid, 1)
    assert state["state"] == "failed" and "is damaged" in state["error"] and victim.stem in state["error"]


# -- the database ---------------------------------------------------------------------------------------------


def one_federation_on_disk(root: Path) -> str:
    store = Store(root)
    fid = store.create_federation(FederationSpec(num_classes=10), 0, time.time()).id
    store.close()
    return fid


@pytest.mark.parametrize("damage", ["deleted", "garbage", "emptied"])
def test_a_missing_or_corrupt_database_refuses_to_start_with_one_line(
    tmp_path: Path, damage: str, capsys, monkeypatch
) -> None:
    root = tmp_path / "data"
    one_federation_on_disk(root)
    db = root / "ktl.sqlite3"
    if damage == "deleted":
        db.unlink()
    elif damage == "garbage":
        db.write_bytes(b"not a database at all " * 500)
    else:
        db.write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        Store(root)
    assert str(db) in str(info.value) and "--repair" in str(info.value)
    monkeypatch.setenv("KTL_ADMIN_TOKEN", ADMIN)
    assert main(["serve", "--data-dir", str(root), "--device", "cpu", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ktl: error: ") and str(db) in err[0], err
    assert "Traceback" not in err[0]
    if damage == "deleted":
        assert not db.exists()  # nothing was created in its place


def test_an_empty_data_folder_still_starts_and_an_old_database_is_migrated(tmp_path: Path) -> None:
    Store(tmp_path / "fresh").close()  # no federations/ yet: a new server, not a lost database
    root = tmp_path / "old"
    (root / "federations" / "fed-old" / "rounds" / "1").mkdir(parents=True)
    (root / "federations" / "fed-old" / "rounds" / "1" / "table.safetensors").write_bytes(b"x" * 10)
    db = sqlite3.connect(root / "ktl.sqlite3")
    db.executescript(
        "CREATE TABLE federations (id TEXT PRIMARY KEY, spec TEXT NOT NULL, etf_seed INTEGER NOT NULL, "
        "current_round INTEGER NOT NULL, created_at REAL NOT NULL);"
        "CREATE TABLE rounds (federation_id TEXT NOT NULL, round INTEGER NOT NULL, state TEXT NOT NULL, "
        "opened_at REAL NOT NULL, deadline_at REAL NOT NULL, closed_at REAL, published_at REAL, error TEXT, "
        "stats TEXT, PRIMARY KEY (federation_id, round));"
    )
    spec = FederationSpec(num_classes=10, method="fedproto").model_dump_json()
    db.execute("INSERT INTO federations VALUES ('fed-old', ?, 0, 1, 0)", (spec,))
    db.execute("INSERT INTO rounds VALUES ('fed-old', 1, 'open', 0, 1e12, NULL, NULL, NULL, NULL)")
    db.commit()
    db.close()
    store = Store(root)
    fed = store.get_federation("fed-old")
    assert fed is not None and fed.state == "active"
    assert store.get_round("fed-old", 1).attempts == 0
    assert store.read_verified(root / "federations/fed-old/rounds/1/table.safetensors") == b"x" * 10
    store.close()


# -- ktl admin check --------------------------------------------------------------------------------------------


def test_admin_check_clean_then_tampered_then_repair_rebuilds_a_lost_database(
    servers: Servers, data_dir: Path, capsys
) -> None:
    http, service, admin = servers.start()
    fed = federation(admin, quorum=2)
    fid = fed["id"]
    a, b = register(admin, http, fid, 2)
    token = a._headers["Authorization"].split()[1]
    a.upload(fid, 1, protos([0, 1]))
    b.upload(fid, 1, protos([2, 3], seed=1))
    wait_round(a, fid, 1)
    a.upload(fid, 2, protos([4], seed=2))  # round 2: open, one upload of two
    spec_copy = json.loads((data_dir / "federations" / fid / "spec.json").read_text())
    assert spec_copy["id"] == fid and spec_copy["spec"]["quorum"] == 2
    upload = service.store.upload_path(fid, 2, service.store.list_clients(fid)[0].id)
    rel = service.store.rel(upload)
    servers.stop()  # check while nothing writes

    assert main(["admin", "check", "--data-dir", str(data_dir)]) == 0
    assert "OK: no problems found" in capsys.readouterr().out

    original = upload.read_bytes()
    upload.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert main(["admin", "check", "--data-dir", str(data_dir)]) == 1
    out = capsys.readouterr().out
    assert rel in out and "SHA-256" in out and "cannot be repaired" in out
    upload.write_bytes(original)

    (data_dir / "ktl.sqlite3").unlink()
    assert main(["admin", "check", "--data-dir", str(data_dir)]) == 1
    assert "the database is missing" in capsys.readouterr().out
    assert main(["admin", "check", "--data-dir", str(data_dir), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "REPAIRED" in out and "rebuilt 1 federation" in out, out
    assert main(["admin", "check", "--data-dir", str(data_dir)]) == 0
    capsys.readouterr()

    http, service, admin = servers.start()  # the rebuilt database: the same federation, clients and tokens
    a = KtlHttpClient("", token, http=http, retries=0)
    got = a.federation(fid)
    assert got["current_round"] == 2 and got["spec"]["quorum"] == 2 and got["etf_seed"] == fed["etf_seed"]
    assert a.round(fid, 1)["state"] == "published" and a.round(fid, 2)["uploads"] == 1
    assert len(a.pairs(fid, 1)) == 4
    b_token = b._headers["Authorization"].split()[1]
    KtlHttpClient("", b_token, http=http, retries=0).upload(fid, 2, protos([5], seed=3))
    assert wait_round(a, fid, 2)["state"] == "published"


def test_admin_check_repair_records_missing_checksums_and_drops_stale_rows(
    servers: Servers, data_dir: Path, capsys
) -> None:
    http, service, admin = servers.start()
    fed = federation(admin, quorum=1)
    (a,) = register(admin, http, fed["id"], 1)
    publish(a, fed["id"], 1)
    store = service.store
    png = store.round_dir(fed["id"], 1) / "pairs.png"
    store.forget_files(store.rel(png))  # a file whose row is missing
    store.record_file("federations/gone.safetensors", "0" * 64, 1)  # a row whose file is gone
    servers.stop()
    assert main(["admin", "check", "--data-dir", str(data_dir)]) == 1
    out = capsys.readouterr().out
    assert "pairs.png" in out and "gone.safetensors" in out and "--repair can fix 2" in out
    assert main(["admin", "check", "--data-dir", str(data_dir), "--repair"]) == 0
    assert main(["admin", "check", "--data-dir", str(data_dir)]) == 0


# -- the store's round lifecycle helpers ----------------------------------------------------------------------


def test_store_lifecycle_helpers(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    spec = FederationSpec(num_classes=10, quorum=1)
    feds = [store.create_federation(spec, 0, float(i)) for i in range(5)]
    ids = [f.id for f in feds]
    assert [f.id for f in store.list_federations()] == ids
    assert [f.id for f in store.list_federations(limit=2)] == ids[:2]
    assert [f.id for f in store.list_federations(limit=2, after=ids[1])] == ids[2:4]
    assert store.list_federations(after=ids[4]) == []

    fid = ids[0]
    assert store.set_federation_state(fid, "paused") and store.get_federation(fid).state == "paused"
    with pytest.raises(ValueError):
        store.set_federation_state(fid, "frozen")
    assert store.start_attempt(fid, 1) == 1 and store.start_attempt(fid, 1) == 2
    assert store.get_round(fid, 1).attempts == 2

    # The round rules are the rounds service's; the store applies what they decide, in one transaction.
    fed = store.get_federation(fid)
    assert store.cancel_round(
        fid, 1, "cancelled by the operator", 10.0, cancel_rule(fed, 10.0)
    )  # round 2 opens
    assert store.get_round(fid, 1).error == "cancelled by the operator"
    assert store.get_federation(fid).current_round == 2 and store.get_round(fid, 2).state == "open"
    assert not store.cancel_round(fid, 1, "again", 11.0)

    client = store.add_client(fid, "c", "hash-0", 1.0)
    payload = protos([0]).to_bytes()
    fed = store.get_federation(fid)
    store.record_upload(fed, 2, client.id, payload, "d", 1, len(payload), 2.0, rule=quorum_rule(fed, 2.0))
    assert store.get_round(fid, 2).state == "aligning"
    with pytest.raises(ConflictError) as info:
        store.delete_federation(fid)
    assert info.value.reason == "round_aligning"

    assert store.start_attempt(fid, 2) == 1
    store.fail_round(fid, 2, "OSError: [Errno 28] No space left on device", 12.0)
    failed = store.rounds_failed_for_storage()
    assert [(r.federation_id, r.round) for r in failed] == [(fid, 2)]
    assert failed[0].error.startswith("insufficient_storage:")
    assert store.retry_round(fid, 2) and store.get_round(fid, 2).state == "aligning"
    assert not store.retry_round(fid, 2) and store.get_round(fid, 2).attempts == 0  # that try is not counted
    assert store.cancel_round(fid, 2, "stop", 13.0) and store.get_round(fid, 3).state == "open"
    store.fail_round(fid, 3, "RuntimeError: boom", 14.0)  # not aligning: nothing happens
    assert not store.retry_round(fid, 3)

    assert store.delete_federation(fid) and not store.delete_federation(fid)
    assert store.get_federation(fid) is None and store.list_clients(fid) == []
    assert not store.federation_dir(fid).exists() and store.file_records(f"federations/{fid}/") == []
    assert [f.id for f in store.list_federations()] == ids[1:]
    store.close()


def test_uploads_refused_for_space_leave_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "data"
    store = Store(root, min_free_bytes=2**62)  # more than any disk: below the threshold
    fed = store.create_federation(FederationSpec(num_classes=10, quorum=2), 0, 0.0)
    client = store.add_client(fed.id, "c", "hash-0", 1.0)
    payload = protos([0]).to_bytes()
    before = tree(root)
    with pytest.raises(InsufficientStorageError) as info:
        store.record_upload(fed, 1, client.id, payload, "d", 1, len(payload), 2.0)
    assert info.value.reason == "insufficient_storage" and info.value.headers == {"Retry-After": "30"}
    assert tree(root) == before

    store.min_free_bytes = 0

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "fsync", no_space)  # the disk fills up while the upload is written
    with pytest.raises(InsufficientStorageError):
        store.record_upload(fed, 1, client.id, payload, "d", 1, len(payload), 2.0)
    monkeypatch.undo()
    assert tree(root) == before and store.uploads(fed.id, 1) == []
    store.record_upload(fed, 1, client.id, payload, "d", 1, len(payload), 2.0)
    assert store.read_verified(store.upload_path(fed.id, 1, client.id)) == payload
    store.close()


def test_readyz_reports_free_space_and_is_not_ready_below_the_minimum(servers: Servers) -> None:
    http, _, _ = servers.start()
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["disk_free_bytes"] > 0
    http, _, _ = servers.start(min_free_bytes=2**62)
    low = http.get("/readyz")
    assert low.status_code == 503 and low.json()["status"] == "low_disk"


# -- refused uploads -------------------------------------------------------------------------------------------


def test_refused_uploads_create_nothing_on_disk(http, service, admin) -> None:
    fed = federation(admin, quorum=2)
    fid = fed["id"]
    (a,) = register(admin, http, fid, 1)
    token = a._headers["Authorization"].split()[1]
    root = service.store.root
    before = tree(root)
    body = protos([0, 1]).to_bytes()
    for r, payload, status in [(99999, body, 409), (2, body, 409), (1, b"junk", 400)]:
        response = http.post(UPLOAD.format(fid=fid, r=r), content=payload, headers=octet(token))
        assert response.status_code == status, response.text
    assert tree(root) == before
    assert not (service.store.round_dir(fid, 99999)).exists()
    assert http.post(UPLOAD.format(fid=fid, r=1), content=body, headers=octet(token)).status_code == 201


def test_a_client_removed_while_its_upload_arrives_is_refused(http, service, admin, monkeypatch) -> None:
    fed = federation(admin, quorum=1)
    fid = fed["id"]
    (a,) = register(admin, http, fid, 1)
    client_id = service.store.list_clients(fid)[0].id
    original = service.store.record_upload

    def removed_meanwhile(*args: Any, **kwargs: Any) -> Any:
        service.federations.remove_client(fid, client_id)  # the body was read and checked; it leaves now
        return original(*args, **kwargs)

    monkeypatch.setattr(service.store, "record_upload", removed_meanwhile)
    before = tree(service.store.root)
    token = a._headers["Authorization"].split()[1]
    response = http.post(UPLOAD.format(fid=fid, r=1), content=protos([0]).to_bytes(), headers=octet(token))
    assert response.status_code == 409 and response.json()["error"]["reason"] == "client_removed"
    assert service.store.uploads(fid, 1) == [] and service.store.get_round(fid, 1).state == "open"
    assert tree(service.store.root) == before


# -- a full disk, for real ------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted on a temporary folder (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root to mount")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: Path, leave: int = 0) -> None:
    """Write zeros to ``path`` until the disk has at most ``leave`` bytes free (or none at all)."""
    chunk = b"\0" * 65536
    with open(path, "wb") as f:
        try:
            while shutil.disk_usage(path.parent).free > leave:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_full_disk_answers_507_keeps_the_connection_and_the_round_retries(small_disk: Path) -> None:
    app = create_app(make_settings(small_disk / "data", min_free_bytes=1 << 20))
    service: KtlService = app.state.service
    server = ServerThread(app, "127.0.0.1", free_port()).start()
    try:
        admin = KtlHttpClient(server.url, ADMIN, retries=0)
        fid = federation(admin, quorum=1)["id"]
        token = admin.register_client(fid, "c")["token"]
        release = threading.Event()
        service.worker.submit(ROUND_PRIORITY, lambda: release.wait(30) and None)  # hold the server step
        upload = httpx.post(f"{server.url}{UPLOAD.format(fid=fid, r=1)}", content=protos([0, 1]).to_bytes(),
                            headers=octet(token))  # fmt: skip
        assert upload.status_code == 201 and upload.json()["state"] == "aligning"

        fill(small_disk / "filler", leave=192 * 1024)  # room for SQLite, not for a state snapshot
        fill(small_disk / "rest")  # nothing at all
        conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=30)
        conn.request("POST", UPLOAD.format(fid=fid, r=2), body=protos([2]).to_bytes(), headers=octet(token))
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 507 and body["error"]["reason"] == "insufficient_storage", body
        assert response.getheader("Retry-After") == "30" and response.getheader("connection") != "close"
        sock = conn.sock
        conn.request("GET", f"/v1/federations/{fid}/rounds/1", headers=auth(token))
        again = conn.getresponse()
        assert again.status == 200 and json.loads(again.read())["state"] == "aligning"
        assert conn.sock is sock and sock is not None  # the same keep-alive connection served both
        conn.close()
        data = small_disk / "data"
        assert not [p for p in data.rglob("*") if p.name.endswith((".tmp", ".partial"))]
        assert not list((data / "tmp").iterdir())
        ready = httpx.get(f"{server.url}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "low_disk"

        (small_disk / "rest").unlink()
        release.set()  # the server step runs out of space writing the method's state
        deadline = time.monotonic() + 30
        while not (state := admin.round(fid, 1))["error"] or state["state"] != "failed":
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        assert state["error"].startswith("insufficient_storage:"), state["error"]
        assert [(r.federation_id, r.round) for r in service.store.rounds_failed_for_storage()] == [(fid, 1)]
        assert not list((data / "federations" / fid / "state").glob(".staging-*"))

        (small_disk / "filler").unlink()  # space comes back
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        if service.store.retry_round(fid, 1):  # (the scheduler may already have done it)
            service.rounds.enqueue(fid, 1)
        deadline = time.monotonic() + 30
        while (state := admin.round(fid, 1))["state"] != "published":
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        accepted = httpx.post(f"{server.url}{UPLOAD.format(fid=fid, r=2)}", content=protos([2]).to_bytes(),
                              headers=octet(token))  # fmt: skip
        assert accepted.status_code == 201
    finally:
        server.stop()


def test_corrupt_file_error_names_what_the_file_is(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    path = store.round_dir("fed-x", 3) / "pairs.safetensors"
    with pytest.raises(CorruptFileError) as info:
        store.read_verified(path)
    assert info.value.reason == "corrupt_file" and "pairs.safetensors of federation fed-x round 3" in str(
        info.value
    )
    store.close()
