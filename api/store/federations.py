"""Federations and their clients: rows, the copies kept beside them for repair (``spec.json``,
``clients.json``), deletion; a row that cannot be read is set aside."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sqlite3

from ktl.api.schemas import FederationSpec
from ktl.api.store.disk import (
    _ensure_dir,
)
from ktl.api.store.files import FileChecksums
from ktl.api.store.records import (
    ClientRecord,
    FederationRecord,
)
from ktl.api.store.schema import (
    FEDERATION_STATES,
)
from ktl.errors import ConflictError, NotFoundError

logger = logging.getLogger(__name__)


def unreadable_reason(exc: ValueError) -> str:
    """One line saying why a stored spec cannot be read: the first failing field and the error."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "spec"
        return f"{where}: {first['msg']}"
    return str(exc).splitlines()[0]


class FederationRows(FileChecksums):
    """The ``federations`` and ``clients`` tables."""

    def create_federation(self, spec: FederationSpec, etf_seed: int, now: float) -> FederationRecord:
        fid = "fed-" + secrets.token_hex(6)
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO federations (id, spec, etf_seed, current_round, created_at, state) "
                    "VALUES (?, ?, ?, 1, ?, 'active')",
                    (fid, spec.model_dump_json(), etf_seed, now),
                )
                db.execute(
                    "INSERT INTO rounds (federation_id, round, state, opened_at, deadline_at) "
                    "VALUES (?, 1, 'open', ?, ?)",
                    (fid, now, now + spec.round_deadline_s),
                )
                self._write_spec_file(db, fid)
                self._write_clients_file(db, fid)
        except BaseException:
            shutil.rmtree(self.federation_dir(fid), ignore_errors=True)
            raise
        return FederationRecord(fid, spec, etf_seed, 1, now)

    def _write_spec_file(self, db: sqlite3.Connection, fid: str) -> None:
        """Inside a transaction: ``federations/<fid>/spec.json``, a copy of the federation's row (for
        ``ktl admin check --repair``)."""
        row = db.execute("SELECT spec, etf_seed, created_at FROM federations WHERE id = ?", (fid,)).fetchone()
        copy = {
            "id": fid,
            "spec": json.loads(row["spec"]),
            "etf_seed": row["etf_seed"],
            "created_at": row["created_at"],
            "note": "a copy of the federation's row, for `ktl admin check --repair`",
        }
        folder = self.federation_dir(fid)
        _ensure_dir(folder)
        self._write_recorded(db, folder / "spec.json", (json.dumps(copy, indent=2) + "\n").encode())

    def write_federation_copies(self, fid: str) -> None:
        """(Re)write a federation's ``spec.json`` and ``clients.json`` from the database."""
        with self.transaction() as db:
            self._write_spec_file(db, fid)
            self._write_clients_file(db, fid)

    def _federation(self, row: sqlite3.Row) -> FederationRecord | None:
        """The record of a federation row, or None where the row cannot be read: then the federation is
        set aside (`set_aside`, logged once) — one bad row must not fail every listing and the start-up."""
        try:
            spec = FederationSpec.model_validate_json(row["spec"])
        except ValueError as exc:  # pydantic's ValidationError is one
            why = unreadable_reason(exc)
            if self.set_aside.get(row["id"]) != why:
                logger.error(
                    "federation %s is set aside: its stored spec cannot be read (%s); delete it "
                    "(DELETE /v1/federations/%s) or fix its row, then restart",
                    row["id"],
                    why,
                    row["id"],
                )
            self.set_aside[row["id"]] = why
            return None
        return FederationRecord(
            row["id"], spec, row["etf_seed"], row["current_round"], row["created_at"], row["state"]
        )

    def get_federation(self, fid: str) -> FederationRecord | None:
        """The federation, or None: unknown, or set aside (`set_aside` says why)."""
        rows = self._query("SELECT * FROM federations WHERE id = ?", (fid,))
        return self._federation(rows[0]) if rows else None

    def list_federations(self, limit: int | None = None, after: str | None = None) -> list[FederationRecord]:
        """Federations in creation order; ``limit`` of them after the federation ``after`` (a page's last
        id; `NotFoundError` if it does not exist)."""
        unknown = NotFoundError("unknown_federation", f"no federation {after!r} to list after")
        rows = self._page("federations", after, limit, newest_first=False, unknown=unknown)
        return [fed for r in rows if (fed := self._federation(r)) is not None]

    def set_federation_state(self, fid: str, state: str) -> bool:
        """Set a federation 'active' or 'paused'; False if it does not exist."""
        if state not in FEDERATION_STATES:
            raise ValueError(f"a federation's state is one of {FEDERATION_STATES}, not {state!r}")
        with self.transaction() as db:
            return db.execute("UPDATE federations SET state = ? WHERE id = ?", (state, fid)).rowcount > 0

    def delete_federation(self, fid: str) -> bool:
        """Delete a federation: its rows (clients, rounds, uploads, file checksums) and its folder. Refused
        (`ConflictError` ``round_aligning``) while one of its rounds is aligning. False if unknown."""
        trash = self.root / "tmp" / f"deleted-{fid}-{secrets.token_hex(4)}"
        folder = self.federation_dir(fid)
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM federations WHERE id = ?", (fid,)).fetchone() is None:
                return False
            row = db.execute(
                "SELECT round FROM rounds WHERE federation_id = ? AND state = 'aligning' ORDER BY round",
                (fid,),
            ).fetchone()
            if row is not None:
                raise ConflictError(
                    "round_aligning",
                    f"round {row[0]} of federation {fid} is aligning; cancel it or wait for it to end "
                    "before deleting the federation",
                    round=int(row[0]),
                )
            for table in ("uploads", "rounds", "clients"):
                db.execute(f"DELETE FROM {table} WHERE federation_id = ?", (fid,))
            prefix = f"federations/{fid}/"
            db.execute("DELETE FROM files WHERE substr(path, 1, ?) = ?", (len(prefix), prefix))
            db.execute("DELETE FROM federations WHERE id = ?", (fid,))
            if folder.exists():  # moved aside inside the transaction: a crash before COMMIT moves it back
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.replace(folder, trash)
        for key in [k for k in self._notes if k[0] == fid]:
            del self._notes[key]
        self.set_aside.pop(fid, None)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _write_clients_file(self, db: sqlite3.Connection, fid: str) -> None:
        """Inside a transaction: ``federations/<fid>/clients.json``, the clients as the transaction sees
        them (for ``ktl admin check --repair``)."""
        rows = db.execute(
            "SELECT id, name, token_hash, active, created_at FROM clients WHERE federation_id = ? "
            "ORDER BY rowid",
            (fid,),
        ).fetchall()
        data = [{**dict(r), "active": bool(r["active"])} for r in rows]
        folder = self.federation_dir(fid)
        _ensure_dir(folder)
        self._write_recorded(db, folder / "clients.json", (json.dumps(data, indent=1) + "\n").encode())

    def add_client(self, fid: str, name: str | None, token_hash: str, now: float) -> ClientRecord:
        cid = "cl-" + secrets.token_hex(6)
        with self.transaction() as db:
            db.execute("INSERT INTO clients VALUES (?, ?, ?, ?, 1, ?)", (cid, fid, name, token_hash, now))
            self._write_clients_file(db, fid)
        return ClientRecord(cid, fid, name, True, now)

    @staticmethod
    def _client(row: sqlite3.Row) -> ClientRecord:
        return ClientRecord(
            row["id"], row["federation_id"], row["name"], bool(row["active"]), row["created_at"]
        )

    def client_by_token_hash(self, token_hash: str) -> ClientRecord | None:
        rows = self._query("SELECT * FROM clients WHERE token_hash = ? AND active = 1", (token_hash,))
        return self._client(rows[0]) if rows else None

    def get_client(self, client_id: str) -> ClientRecord | None:
        rows = self._query("SELECT * FROM clients WHERE id = ?", (client_id,))
        return self._client(rows[0]) if rows else None

    def list_clients(self, fid: str) -> list[ClientRecord]:
        return [
            self._client(r)
            for r in self._query("SELECT * FROM clients WHERE federation_id = ? ORDER BY created_at", (fid,))
        ]

    def count_active_clients(self, fid: str) -> int:
        return int(
            self._query("SELECT COUNT(*) FROM clients WHERE federation_id = ? AND active = 1", (fid,))[0][0]
        )

    def deactivate_client(self, client_id: str) -> None:
        with self.transaction() as db:
            row = db.execute("SELECT federation_id FROM clients WHERE id = ?", (client_id,)).fetchone()
            db.execute("UPDATE clients SET active = 0 WHERE id = ?", (client_id,))
            if row is not None:
                self._write_clients_file(db, str(row[0]))
