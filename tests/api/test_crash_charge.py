"""A crash is charged to the round whose server step was executing, not to every round under way, and a
federation whose steps keep stopping the server is paused with the reason (issue 23, item 3)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ktl.api import create_app
from ktl.api.schemas import FederationSpec
from ktl.api.services.ledger import LEDGER_NAME
from ktl.api.store import DB_NAME, Store
from ktl.clients.sdk import KtlHttpClient
from ktl.errors import InsufficientStorageError
from tests.api.conftest import ADMIN, make_settings, protos


def _federation_with_an_upload(store: Store, name: str) -> str:
    """A fedproto federation (quorum 1) with one upload in round 1."""
    fed = store.create_federation(
        FederationSpec(method="fedproto", num_classes=10, quorum=1, name=name), 0, 1.0
    )
    client = store.add_client(fed.id, "c", f"hash-{name}", 1.0)
    payload = protos([0, 1]).to_bytes()
    store.record_upload(store.get_federation(fed.id), 1, client.id, payload, "d", 2, len(payload), 2.0)
    return fed.id


def _aligning(data_dir: Path, fid: str) -> None:
    """Round 1 closed (its step due, 'aligning'), round 2 open: as the round rules leave a full round."""
    with sqlite3.connect(data_dir / DB_NAME) as db:
        db.execute(
            "UPDATE rounds SET state = 'aligning', closed_at = 2.0 WHERE federation_id = ? AND round = 1",
            (fid,),
        )
        if (
            db.execute("SELECT 1 FROM rounds WHERE federation_id = ? AND round = 2", (fid,)).fetchone()
            is None
        ):
            db.execute("INSERT INTO rounds (federation_id, round, state, opened_at, deadline_at) "
                       "VALUES (?, 2, 'open', 2.0, 1e12)", (fid,))  # fmt: skip
        db.execute("UPDATE federations SET current_round = 2 WHERE id = ?", (fid,))


def _crashed_while_a_executed(data_dir: Path) -> tuple[str, str]:
    """Two federations, each with round 1's step started (and counted) before a crash; the previous life
    died while A's step executed and B's waited for its next slice. Returns (A, B)."""
    store = Store(data_dir)
    a, b = _federation_with_an_upload(store, "a"), _federation_with_an_upload(store, "b")
    store.close()
    for fid in (a, b):
        _aligning(data_dir, fid)
    store = Store(data_dir)
    for fid in (a, b):
        assert store.get_round(fid, 1).state == "aligning" and store.start_attempt(fid, 1) == 1
    store.close()
    (data_dir / LEDGER_NAME).write_text(json.dumps({"started": [[a, 1], [b, 1]], "executing": [a, 1]}))
    return a, b


def test_a_crash_is_charged_to_the_executing_step_only(tmp_path: Path) -> None:
    """Old code: both rounds under way at the crash were charged; with max_round_attempts = 1 both were
    given up. Here the previous life died while A's step executed and B's waited for its next slice."""
    settings = make_settings(tmp_path / "data", max_round_attempts=1)
    a, b = _crashed_while_a_executed(settings.data_dir)

    with TestClient(create_app(settings)) as http:
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        deadline = time.monotonic() + 60
        while {admin.round(f, 1)["state"] for f in (a, b)} & {"open", "aligning"}:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        failed, published = admin.round(a, 1), admin.round(b, 1)
        assert failed["state"] == "failed" and "attempts_exhausted" in failed["error"], failed
        assert published["state"] == "published", published  # not charged for A's crash
        assert admin.federation(a)["state"] == "paused" and "paused" in failed["error"]
        assert admin.federation(b)["state"] == "active"
    assert not (settings.data_dir / LEDGER_NAME).exists()  # a graceful stop leaves nothing to charge


def test_a_server_killed_while_the_disk_was_full_starts_and_gives_the_attempt_back_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chaos soak's kill inside a disk-full window: at start-up, giving back the attempt of a step that
    was not executing failed on ENOSPC and the server refused to start. It starts now, and the attempt is
    given back once there is room (`RoundService.reconcile`)."""
    settings = make_settings(tmp_path / "data", max_round_attempts=3)
    a, b = _crashed_while_a_executed(settings.data_dir)
    calls: list[tuple[str, int, bool]] = []
    release = Store.release_attempt

    def full_disk_once(self: Store, fid: str, r: int) -> None:
        if not calls:
            calls.append((fid, r, False))
            raise InsufficientStorageError("disk_full", "the disk is full")
        calls.append((fid, r, True))
        release(self, fid, r)

    monkeypatch.setattr(Store, "release_attempt", full_disk_once)
    with TestClient(create_app(settings)) as http:  # starts: the full disk is not fatal
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        deadline = time.monotonic() + 60
        busy = {"open", "aligning"}
        while (b, 1, True) not in calls or {admin.round(f, 1)["state"] for f in (a, b)} & busy:
            assert time.monotonic() < deadline, calls
            time.sleep(0.05)
        assert calls[0] == (b, 1, False) and admin.round(b, 1)["state"] == "published"
