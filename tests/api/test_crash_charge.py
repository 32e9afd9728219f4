"""A crash is charged to the round whose server step was executing, not to every round under way, and a
federation whose steps keep stopping the server is paused with the reason (issue 23, item 3)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from fastapi.testclient import TestClient

from ktl.api import create_app
from ktl.api.schemas import FederationSpec
from ktl.api.services.ledger import LEDGER_NAME
from ktl.api.store import DB_NAME, Store
from ktl.clients.sdk import KtlHttpClient
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


def test_a_crash_is_charged_to_the_executing_step_only(tmp_path: Path) -> None:
    """Old code: both rounds under way at the crash were charged; with max_round_attempts = 1 both were
    given up. Here the previous life died while A's step executed and B's waited for its next slice."""
    settings = make_settings(tmp_path / "data", max_round_attempts=1)
    store = Store(settings.data_dir)
    a, b = _federation_with_an_upload(store, "a"), _federation_with_an_upload(store, "b")
    store.close()
    for fid in (a, b):
        _aligning(settings.data_dir, fid)
    store = Store(settings.data_dir)
    for fid in (a, b):  # each step was started (and counted) before the crash
        assert store.get_round(fid, 1).state == "aligning" and store.start_attempt(fid, 1) == 1
    store.close()
    (settings.data_dir / LEDGER_NAME).write_text(
        json.dumps({"started": [[a, 1], [b, 1]], "executing": [a, 1]})
    )

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
