"""Durable state: SQLite for metadata, safetensors files for tensors, every write atomic.

Files are written to a temporary name in the target folder, fsynced, renamed into place and the folder
fsynced; metadata changes are SQLite transactions (WAL, ``synchronous=FULL``). An upload is acknowledged
only after its file is in place and its row is committed, so a ``kill -9`` at any moment loses nothing
that a client was told was accepted. A file without a row (a crash between the two) is never read.

Layout under ``data_dir``::

    ktl.sqlite3
    federations/<fid>/rounds/<r>/uploads/<client>.safetensors
    federations/<fid>/rounds/<r>/<the method's broadcast file and published files>
                                                  (fedktl: pairs.safetensors, pairs.png, centroids.safetensors, …;
                                                   the table methods: table.safetensors)
    federations/<fid>/state/round-<r>/            (the method's server state after round r, HF-style)
    jobs/<job>.safetensors
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktl.api.schemas import FederationSpec, JobSpec
from ktl.errors import ConflictError

__all__ = [
    "ClientRecord",
    "FederationRecord",
    "JobRecord",
    "RoundRecord",
    "Store",
    "UploadRecord",
    "atomic_write",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS federations (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, etf_seed INTEGER NOT NULL,
    current_round INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    id TEXT PRIMARY KEY, federation_id TEXT NOT NULL REFERENCES federations(id), name TEXT,
    token_hash TEXT NOT NULL UNIQUE, active INTEGER NOT NULL DEFAULT 1, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    federation_id TEXT NOT NULL REFERENCES federations(id), round INTEGER NOT NULL, state TEXT NOT NULL,
    opened_at REAL NOT NULL, deadline_at REAL NOT NULL, closed_at REAL, published_at REAL,
    error TEXT, stats TEXT, PRIMARY KEY (federation_id, round));
CREATE INDEX IF NOT EXISTS rounds_by_state ON rounds(state);
CREATE TABLE IF NOT EXISTS uploads (
    federation_id TEXT NOT NULL, round INTEGER NOT NULL, client_id TEXT NOT NULL REFERENCES clients(id),
    digest TEXT NOT NULL, num_rows INTEGER NOT NULL, bytes INTEGER NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (federation_id, round, client_id));
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, total INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    error TEXT, restarts INTEGER NOT NULL DEFAULT 0);
"""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a fresh fsynced temporary file beside ``path``; returns the temporary path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def commit_temp(tmp: Path, path: Path) -> None:
    """Rename a `write_temp` file into place and make the rename durable."""
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: temporary file, fsync, rename, fsync of the folder."""
    commit_temp(write_temp(path, data), path)


@dataclass(frozen=True)
class FederationRecord:
    id: str
    spec: FederationSpec
    etf_seed: int
    current_round: int
    created_at: float


@dataclass(frozen=True)
class ClientRecord:
    id: str
    federation_id: str
    name: str | None
    active: bool
    created_at: float


@dataclass(frozen=True)
class RoundRecord:
    federation_id: str
    round: int
    state: str
    opened_at: float
    deadline_at: float
    closed_at: float | None
    published_at: float | None
    error: str | None
    stats: dict[str, Any] | None


@dataclass(frozen=True)
class UploadRecord:
    federation_id: str
    round: int
    client_id: str
    digest: str
    num_rows: int
    bytes: int
    received_at: float


@dataclass(frozen=True)
class JobRecord:
    id: str
    spec: JobSpec
    state: str
    total: int
    done: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    restarts: int


@dataclass(frozen=True)
class UploadResult:
    duplicate: bool
    uploads: int
    state: str
    closed: bool  # this upload completed the quorum and closed the round


class Store:
    """All reads and writes of server state. Thread-safe: one connection behind a lock."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "ktl.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Delete what a crash can leave behind: temporary files and staged aligner folders (never read)."""
        for pattern in (".*.tmp", ".*.partial"):
            for path in self.root.rglob(pattern):
                path.unlink(missing_ok=True)
        for path in self.root.glob("federations/*/state/.staging-*"):
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- paths ------------------------------------------------------------------------------------

    def round_dir(self, fid: str, r: int) -> Path:
        return self.root / "federations" / fid / "rounds" / str(r)

    def upload_path(self, fid: str, r: int, client_id: str) -> Path:
        return self.round_dir(fid, r) / "uploads" / f"{client_id}.safetensors"

    def state_dir(self, fid: str, r: int) -> Path:
        return self.root / "federations" / fid / "state" / f"round-{r}"

    def job_result_path(self, job_id: str) -> Path:
        return self.root / "jobs" / f"{job_id}.safetensors"

    # -- federations and clients --------------------------------------------------------------------

    def create_federation(self, spec: FederationSpec, etf_seed: int, now: float) -> FederationRecord:
        fid = "fed-" + secrets.token_hex(6)
        with self.transaction() as db:
            db.execute(
                "INSERT INTO federations VALUES (?, ?, ?, 1, ?)", (fid, spec.model_dump_json(), etf_seed, now)
            )
            db.execute(
                "INSERT INTO rounds (federation_id, round, state, opened_at, deadline_at) VALUES (?, 1, 'open', ?, ?)",
                (fid, now, now + spec.round_deadline_s),
            )
        return FederationRecord(fid, spec, etf_seed, 1, now)

    @staticmethod
    def _federation(row: sqlite3.Row) -> FederationRecord:
        spec = FederationSpec.model_validate_json(row["spec"])
        return FederationRecord(row["id"], spec, row["etf_seed"], row["current_round"], row["created_at"])

    def get_federation(self, fid: str) -> FederationRecord | None:
        rows = self._query("SELECT * FROM federations WHERE id = ?", (fid,))
        return self._federation(rows[0]) if rows else None

    def list_federations(self) -> list[FederationRecord]:
        return [self._federation(r) for r in self._query("SELECT * FROM federations ORDER BY created_at")]

    def add_client(self, fid: str, name: str | None, token_hash: str, now: float) -> ClientRecord:
        cid = "cl-" + secrets.token_hex(6)
        with self.transaction() as db:
            db.execute("INSERT INTO clients VALUES (?, ?, ?, ?, 1, ?)", (cid, fid, name, token_hash, now))
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
            db.execute("UPDATE clients SET active = 0 WHERE id = ?", (client_id,))

    # -- rounds and uploads ---------------------------------------------------------------------------

    @staticmethod
    def _round(row: sqlite3.Row) -> RoundRecord:
        stats = json.loads(row["stats"]) if row["stats"] else None
        return RoundRecord(
            row["federation_id"],
            row["round"],
            row["state"],
            row["opened_at"],
            row["deadline_at"],
            row["closed_at"],
            row["published_at"],
            row["error"],
            stats,
        )

    def get_round(self, fid: str, r: int) -> RoundRecord | None:
        rows = self._query("SELECT * FROM rounds WHERE federation_id = ? AND round = ?", (fid, r))
        return self._round(rows[0]) if rows else None

    def rounds_in_state(self, state: str) -> list[RoundRecord]:
        rows = self._query("SELECT * FROM rounds WHERE state = ? ORDER BY federation_id, round", (state,))
        return [self._round(r) for r in rows]

    def latest_published_round(self, fid: str) -> int | None:
        rows = self._query(
            "SELECT MAX(round) FROM rounds WHERE federation_id = ? AND state = 'published'", (fid,)
        )
        return rows[0][0]

    def uploads(self, fid: str, r: int) -> list[UploadRecord]:
        """A round's uploads in the order their clients registered (deterministic across runs; client ids
        are random, so ordering by id would reorder the aligner's sums from one run to the next)."""
        rows = self._query(
            "SELECT u.* FROM uploads u JOIN clients c ON c.id = u.client_id "
            "WHERE u.federation_id = ? AND u.round = ? ORDER BY c.rowid",
            (fid, r),
        )
        return [UploadRecord(**dict(row)) for row in rows]

    @staticmethod
    def _count_uploads(db: sqlite3.Connection, fid: str, r: int) -> int:
        return int(
            db.execute(
                "SELECT COUNT(*) FROM uploads WHERE federation_id = ? AND round = ?", (fid, r)
            ).fetchone()[0]
        )

    def record_upload(
        self,
        fed: FederationRecord,
        r: int,
        client_id: str,
        payload: bytes,
        digest: str,
        num_rows: int,
        received_bytes: int,
        now: float,
    ) -> UploadResult:
        """Store an upload for round ``r`` and close the round if it completes the quorum.

        Raises `ConflictError` for a round that is not the open one, or for a different second upload
        by the same client; in both cases nothing is written.
        """
        final = self.upload_path(fed.id, r, client_id)
        tmp = write_temp(final, payload)  # the slow part (fsync) happens outside the lock
        try:
            with self.transaction() as db:
                current = int(
                    db.execute("SELECT current_round FROM federations WHERE id = ?", (fed.id,)).fetchone()[0]
                )
                row = db.execute(
                    "SELECT state FROM rounds WHERE federation_id = ? AND round = ?", (fed.id, r)
                ).fetchone()
                state = None if row is None else str(row[0])
                prior = db.execute(
                    "SELECT digest FROM uploads WHERE federation_id = ? AND round = ? AND client_id = ?",
                    (fed.id, r, client_id),
                ).fetchone()
                if prior is not None:  # checked before the round's state: a retry of the upload that
                    # completed the quorum (its answer lost) must still get its 200
                    if prior[0] != digest:
                        raise ConflictError(
                            "conflicting_upload",
                            f"client {client_id} already uploaded different prototypes for round {r}",
                            current_round=current,
                        )
                    count = self._count_uploads(db, fed.id, r)
                    return UploadResult(duplicate=True, uploads=count, state=str(state), closed=False)
                if r != current or state != "open":
                    late = r < current
                    raise ConflictError(
                        "round_closed" if late else "round_not_open",
                        f"round {r} is {'closed' if late else 'not open yet'}; the current round is {current}",
                        current_round=current,
                    )
                commit_temp(tmp, final)
                db.execute(
                    "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (fed.id, r, client_id, digest, num_rows, received_bytes, now),
                )
                count = self._count_uploads(db, fed.id, r)
                closed = count >= fed.spec.quorum
                if closed:
                    self._close_round(db, fed, r, now)
                return UploadResult(
                    duplicate=False, uploads=count, state="aligning" if closed else "open", closed=closed
                )
        finally:
            tmp.unlink(missing_ok=True)

    def _close_round(self, db: sqlite3.Connection, fed: FederationRecord, r: int, now: float) -> None:
        db.execute(
            "UPDATE rounds SET state = 'aligning', closed_at = ? WHERE federation_id = ? AND round = ?",
            (now, fed.id, r),
        )
        db.execute(
            "INSERT INTO rounds (federation_id, round, state, opened_at, deadline_at) VALUES (?, ?, 'open', ?, ?)",
            (fed.id, r + 1, now, now + fed.spec.round_deadline_s),
        )
        db.execute("UPDATE federations SET current_round = ? WHERE id = ?", (r + 1, fed.id))

    def close_if_ready(self, fid: str, r: int, now: float) -> bool:
        """Close open round ``r`` if the lifecycle rule says so: its uploads reach the quorum, or its
        deadline has passed with at least one upload. Used by the deadline scheduler and by recovery."""
        with self.transaction() as db:
            fed = self.get_federation(fid)
            row = db.execute(
                "SELECT state, deadline_at FROM rounds WHERE federation_id = ? AND round = ?", (fid, r)
            ).fetchone()
            if fed is None or row is None or row[0] != "open":
                return False
            n = self._count_uploads(db, fid, r)
            if n < fed.spec.quorum and not (row[1] <= now and n >= 1):
                return False
            self._close_round(db, fed, r, now)
            return True

    def due_rounds(self, now: float) -> list[tuple[str, int]]:
        rows = self._query(
            "SELECT r.federation_id, r.round FROM rounds r WHERE r.state = 'open' AND r.deadline_at <= ? "
            "AND EXISTS (SELECT 1 FROM uploads u WHERE u.federation_id = r.federation_id AND u.round = r.round)",
            (now,),
        )
        return [(row[0], row[1]) for row in rows]

    def load_uploads(self, fid: str, r: int) -> dict[str, bytes]:
        """A round's stored uploads (client id → bytes) in the clients' registration order."""
        return {u.client_id: self.upload_path(fid, r, u.client_id).read_bytes() for u in self.uploads(fid, r)}

    def most_uploads_by_one_client(self, fid: str) -> int:
        """The largest number of rounds any one client of ``fid`` uploaded to (its privacy releases)."""
        rows = self._query(
            "SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM uploads WHERE federation_id = ? GROUP BY client_id)",
            (fid,),
        )
        return int(rows[0][0] or 0)

    def publish_round(
        self, fid: str, r: int, files: dict[str, bytes], stats: dict[str, Any], now: float
    ) -> None:
        """Write the round's files (pairs, grid, centroids) atomically, then mark it published."""
        for name, data in files.items():
            atomic_write(self.round_dir(fid, r) / name, data)
        with self.transaction() as db:
            db.execute(
                "UPDATE rounds SET state = 'published', published_at = ?, stats = ?, error = NULL "
                "WHERE federation_id = ? AND round = ? AND state = 'aligning'",
                (now, json.dumps(stats), fid, r),
            )

    def fail_round(self, fid: str, r: int, error: str, now: float) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE rounds SET state = 'failed', published_at = ?, error = ? "
                "WHERE federation_id = ? AND round = ? AND state = 'aligning'",
                (now, error[:2000], fid, r),
            )

    # -- the method's server state, one snapshot per round ----------------------------------------------

    def commit_state(self, fid: str, r: int, staged: Path, keep: int) -> None:
        """Move a staged state folder into place as the snapshot after round ``r``; prune old ones."""
        final = self.state_dir(fid, r)
        for f in staged.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():  # a previous attempt at this round crashed after saving
            shutil.rmtree(final)
        os.replace(staged, final)
        _fsync_dir(final.parent)
        snapshots = sorted(self.state_snapshots(fid))
        for old in snapshots[:-keep]:
            shutil.rmtree(self.state_dir(fid, old), ignore_errors=True)

    def state_snapshots(self, fid: str) -> list[int]:
        folder = self.root / "federations" / fid / "state"
        if not folder.is_dir():
            return []
        return [int(p.name.removeprefix("round-")) for p in folder.iterdir() if p.name.startswith("round-")]

    def staging_dir(self, fid: str) -> Path:
        path = self.root / "federations" / fid / "state" / f".staging-{secrets.token_hex(4)}"
        path.mkdir(parents=True)
        return path

    # -- jobs -------------------------------------------------------------------------------------

    @staticmethod
    def _job(row: sqlite3.Row) -> JobRecord:
        data = dict(row)
        data["spec"] = JobSpec.model_validate_json(data["spec"])
        return JobRecord(**data)

    def create_job(self, spec: JobSpec, total: int, now: float) -> JobRecord:
        jid = "job-" + secrets.token_hex(8)
        with self.transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, spec, state, total, created_at) VALUES (?, ?, 'queued', ?, ?)",
                (jid, spec.model_dump_json(), total, now),
            )
        job = self.get_job(jid)
        if job is None:  # pragma: no cover - the row was just written
            raise RuntimeError("job vanished")
        return job

    def get_job(self, job_id: str) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return self._job(rows[0]) if rows else None

    def jobs_in_states(self, *states: str) -> list[JobRecord]:
        marks = ",".join("?" * len(states))
        return [
            self._job(r)
            for r in self._query(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at", states)
        ]

    def update_job(self, job_id: str, *, only_if: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Set columns of a job; with ``only_if``, only while its state is one of those. True if it changed."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        sql = f"UPDATE jobs SET {sets} WHERE id = ?"
        args: tuple[Any, ...] = (*fields.values(), job_id)
        if only_if:
            sql += f" AND state IN ({','.join('?' * len(only_if))})"
            args += only_if
        with self.transaction() as db:
            return db.execute(sql, args).rowcount > 0
