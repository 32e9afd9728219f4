"""Rounds and uploads: rows, upload files, publishing, failures, attempts, the clients' metrics. The
round rules (quorum, deadline, what opens next) are the rounds service's (`ktl.api.services.rounds`):
the store applies their decisions (`RoundChange`) in the transaction that read the facts."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sqlite3
from typing import Any

from ktl.api.store.disk import (
    STORAGE_PREFIX,
    _ensure_dir,
    atomic_write,
    commit_temp,
    storage_failure,
    write_temp,
)
from ktl.api.store.files import FileChecksums
from ktl.api.store.records import (
    FederationRecord,
    MetricSums,
    RoundChange,
    RoundFacts,
    RoundRecord,
    RoundRule,
    UploadRecord,
    UploadResult,
)
from ktl.errors import ConflictError

ENDED_FILE = "ended.json"  # a round ended without publishing (cancelled): what a rebuild keeps of it

logger = logging.getLogger(__name__)


class RoundRows(FileChecksums):
    """The ``rounds`` and ``uploads`` tables and the files of a round."""

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
            row["attempts"],
        )

    def get_round(self, fid: str, r: int) -> RoundRecord | None:
        rows = self._query("SELECT * FROM rounds WHERE federation_id = ? AND round = ?", (fid, r))
        return self._round(rows[0]) if rows else None

    def rounds_between(self, fid: str, first: int, last: int) -> list[RoundRecord]:
        """The federation's rounds ``first``–``last`` that exist, in order."""
        rows = self._query(
            "SELECT * FROM rounds WHERE federation_id = ? AND round BETWEEN ? AND ? ORDER BY round",
            (fid, first, last),
        )
        return [self._round(r) for r in rows]

    def rounds_in_state(self, state: str) -> list[RoundRecord]:
        rows = self._query("SELECT * FROM rounds WHERE state = ? ORDER BY federation_id, round", (state,))
        return [self._round(r) for r in rows]

    def aligning_round(self, fid: str) -> int | None:
        """The federation's round whose server step is due or running, if any (it blocks deletion)."""
        rows = self._query(
            "SELECT MIN(round) FROM rounds WHERE federation_id = ? AND state = 'aligning'", (fid,)
        )
        return rows[0][0]

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

    def _upload_verdict(
        self, db: sqlite3.Connection, fed: FederationRecord, r: int, client_id: str, digest: str
    ) -> UploadResult | None:
        """The answer to an upload decided by the rows alone (a duplicate, or a refusal raised), or None
        when it is to be stored."""
        current = int(
            db.execute("SELECT current_round FROM federations WHERE id = ?", (fed.id,)).fetchone()[0]
        )
        client = db.execute("SELECT active FROM clients WHERE id = ?", (client_id,)).fetchone()
        if client is None or not client[0]:
            raise ConflictError(
                "client_removed",
                f"client {client_id} was removed from federation {fed.id}; its upload is not accepted",
                current_round=current,
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
        return None

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
        metrics: str | None = None,
        rule: RoundRule | None = None,
    ) -> UploadResult:
        """Store an upload for round ``r`` (with the client's evaluation ``metrics``, JSON, if it sent
        any); then, in the same transaction, apply what ``rule`` (the rounds service's) decides from the
        round's facts — closing the round when the upload completes its quorum.

        Raises `ConflictError` for a round that is not the open one, for a different second upload by the
        same client, or for a client removed while its upload arrived; `InsufficientStorageError` when the
        disk is (nearly) full. In every refusal nothing is written: the file is written first in ``tmp/``
        and moved into the round's folder (created then) inside the transaction that records it.
        """
        with self._lock:  # refusals decided by the rows need no disk write at all
            verdict = self._upload_verdict(self._db, fed, r, client_id, digest)
        if verdict is not None:
            return verdict
        self._check_free_space(f"the upload of client {client_id}")
        final = self.upload_path(fed.id, r, client_id)
        tmp = write_temp(final, payload, self.root / "tmp")  # the slow part (fsync) happens outside the lock
        checksum = hashlib.sha256(payload).hexdigest()
        try:
            with self.transaction() as db:
                verdict = self._upload_verdict(db, fed, r, client_id, digest)
                if verdict is not None:
                    return verdict
                _ensure_dir(final.parent)
                commit_temp(tmp, final)
                self._record_file(db, self.rel(final), checksum, len(payload))
                db.execute(
                    "INSERT INTO uploads (federation_id, round, client_id, digest, num_rows, bytes, "
                    "received_at, metrics) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (fed.id, r, client_id, digest, num_rows, received_bytes, now, metrics),
                )
                facts = self._round_facts(db, fed.id, r)
                change = rule(facts) if rule is not None and facts is not None else None
                if change is not None:
                    self._apply(db, fed.id, change)
                closed = change is not None and change.close == r
                return UploadResult(
                    duplicate=False,
                    uploads=facts.uploads if facts is not None else 0,
                    state="aligning" if closed else "open",
                    closed=closed,
                )
        finally:
            tmp.unlink(missing_ok=True)

    def _round_facts(self, db: sqlite3.Connection, fid: str, r: int) -> RoundFacts | None:
        row = db.execute(
            "SELECT r.state, r.deadline_at, f.current_round FROM rounds r JOIN federations f "
            "ON f.id = r.federation_id WHERE r.federation_id = ? AND r.round = ?",
            (fid, r),
        ).fetchone()
        if row is None:
            return None
        return RoundFacts(fid, r, str(row[0]), float(row[1]), self._count_uploads(db, fid, r), int(row[2]))

    @staticmethod
    def _apply(db: sqlite3.Connection, fid: str, change: RoundChange) -> None:
        """Inside a transaction: close round ``change.close`` (if still open), open ``change.open``."""
        if change.close is not None:
            db.execute(
                "UPDATE rounds SET state = 'aligning', closed_at = ? "
                "WHERE federation_id = ? AND round = ? AND state = 'open'",
                (change.at, fid, change.close),
            )
        if change.open is not None:
            if change.deadline_at is None:
                raise ValueError("a round opens with its deadline")
            db.execute(
                "INSERT INTO rounds (federation_id, round, state, opened_at, deadline_at) "
                "VALUES (?, ?, 'open', ?, ?)",
                (fid, change.open, change.at, change.deadline_at),
            )
            db.execute("UPDATE federations SET current_round = ? WHERE id = ?", (change.open, fid))

    def change_round(self, fid: str, r: int, rule: RoundRule) -> bool:
        """Apply what ``rule`` decides for open round ``r`` from its facts, read and applied in one
        transaction (the deadline scheduler and recovery close rounds this way). False if the round is not
        open or the rule changes nothing."""
        with self.transaction() as db:
            facts = self._round_facts(db, fid, r)
            if facts is None or facts.state != "open":
                return False
            change = rule(facts)
            if change is None:
                return False
            self._apply(db, fid, change)
            return True

    def open_rounds_past_deadline(self, now: float) -> list[tuple[str, int]]:
        """Open rounds whose deadline has passed and that hold an upload (the candidates the deadline rule
        looks at: a round without uploads stays open whatever the time, so it is not even read)."""
        rows = self._query(
            "SELECT r.federation_id, r.round FROM rounds r WHERE r.state = 'open' AND r.deadline_at <= ? "
            "AND EXISTS (SELECT 1 FROM uploads u WHERE u.federation_id = r.federation_id AND u.round = r.round)",
            (now,),
        )
        return [(row[0], row[1]) for row in rows]

    def load_uploads(self, fid: str, r: int) -> dict[str, bytes]:
        """A round's stored uploads (client id → bytes) in the clients' registration order, each checked
        against its checksum (`CorruptFileError` naming the upload otherwise)."""
        return {
            u.client_id: self.read_verified(self.upload_path(fid, r, u.client_id))
            for u in self.uploads(fid, r)
        }

    def metric_sums(self, fid: str, first: int, last: int) -> list[MetricSums]:
        """The clients' metrics of rounds ``first``–``last``, summed in SQLite per round and name (memory
        bounded by rounds × names, whatever the number of clients), ordered by round and name."""
        rows = self._query(
            "SELECT u.round, m.key, COUNT(*), SUM(n), SUM(n * m.value), SUM(n * m.value * m.value), "
            "MIN(m.value), MAX(m.value) "
            "FROM (SELECT round, metrics, json_extract(metrics, '$.n_samples') AS n FROM uploads "
            "      WHERE federation_id = ? AND round BETWEEN ? AND ? AND metrics IS NOT NULL) u, "
            "     json_each(u.metrics) m "
            "WHERE m.key != 'n_samples' GROUP BY u.round, m.key ORDER BY u.round, m.key",
            (fid, first, last),
        )
        return [MetricSums(int(r[0]), str(r[1]), int(r[2]), int(r[3]), *map(float, r[4:])) for r in rows]

    def most_uploads_by_one_client(self, fid: str) -> int:
        """The largest number of rounds any one client of ``fid`` uploaded to (its privacy releases)."""
        rows = self._query(
            "SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM uploads WHERE federation_id = ? GROUP BY client_id)",
            (fid,),
        )
        return int(rows[0][0] or 0)

    def note_round(self, fid: str, r: int, **stats: Any) -> None:
        """Facts about round ``r``'s server step (e.g. that its state snapshot was skipped) to add to the
        round's stats when it is published."""
        with self._lock:
            self._notes.setdefault((fid, r), {}).update(stats)

    def publish_round(
        self, fid: str, r: int, files: dict[str, bytes], stats: dict[str, Any], now: float
    ) -> None:
        """Write the round's files (pairs, grid, centroids) atomically, then, in one transaction, record
        their checksums and mark the round published (its stats with any `note_round` facts)."""
        folder = self.round_dir(fid, r)
        written = {name: (atomic_write(folder / name, data), len(data)) for name, data in files.items()}
        with self._lock:
            notes = self._notes.pop((fid, r), {})
        with self.transaction() as db:
            for name, (digest, size) in written.items():
                self._record_file(db, self.rel(folder / name), digest, size)
            db.execute(
                "UPDATE rounds SET state = 'published', published_at = ?, stats = ?, error = NULL "
                "WHERE federation_id = ? AND round = ? AND state = 'aligning'",
                (now, json.dumps({**stats, **notes}), fid, r),
            )

    def fail_round(self, fid: str, r: int, error: str, now: float) -> None:
        """Mark an aligning round failed. An error that says the disk was full is kept as
        ``insufficient_storage: …`` (see `rounds_failed_for_storage`); the federation's staged state
        folders are removed (they hold a half-written snapshot)."""
        with self._lock:
            self._notes.pop((fid, r), None)
        for path in (self.federation_dir(fid) / "state").glob(".staging-*"):
            shutil.rmtree(path, ignore_errors=True)
        self._small_write(
            "UPDATE rounds SET state = 'failed', published_at = ?, error = ? "
            "WHERE federation_id = ? AND round = ? AND state = 'aligning'",
            (now, storage_failure(error)[:2000], fid, r),
        )

    def rounds_failed_for_storage(self) -> list[RoundRecord]:
        """Rounds whose server step failed because the disk was full (to retry once there is space)."""
        rows = self._query(
            "SELECT * FROM rounds WHERE state = 'failed' AND substr(error, 1, ?) = ? "
            "ORDER BY federation_id, round",
            (len(STORAGE_PREFIX), STORAGE_PREFIX),
        )
        return [self._round(r) for r in rows]

    def retry_round(self, fid: str, r: int) -> bool:
        """Put a round that failed for lack of space back to 'aligning' (the caller queues its server step);
        the attempt that ran out of space is not counted in ``attempts``. False if it is not such a round."""
        return (
            self._small_write(
                "UPDATE rounds SET state = 'aligning', published_at = NULL, error = NULL, "
                "attempts = MAX(attempts - 1, 0) "
                "WHERE federation_id = ? AND round = ? AND state = 'failed' AND substr(error, 1, ?) = ?",
                (fid, r, len(STORAGE_PREFIX), STORAGE_PREFIX),
            )
            > 0
        )

    def start_attempt(self, fid: str, r: int) -> int:
        """Count one more try of round ``r``'s server step; returns the count (0: no such round)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE rounds SET attempts = attempts + 1 WHERE federation_id = ? AND round = ?", (fid, r)
            )
            row = db.execute(
                "SELECT attempts FROM rounds WHERE federation_id = ? AND round = ?", (fid, r)
            ).fetchone()
        return int(row[0]) if row is not None else 0

    def release_attempt(self, fid: str, r: int) -> None:
        """Un-count the attempt of a round whose step was stopped on purpose (a graceful shutdown)."""
        self._small_write(
            "UPDATE rounds SET attempts = attempts - 1 WHERE federation_id = ? AND round = ? AND attempts > 0",
            (fid, r),
        )

    def cancel_round(self, fid: str, r: int, reason: str, now: float, rule: RoundRule | None = None) -> bool:
        """End an open or aligning round as failed with ``reason``, then apply what ``rule`` decides from
        the round's facts before the cancel (the rounds service opens the next round when the open one
        is cancelled). False if the round is neither open nor aligning."""
        with self.transaction() as db:
            facts = self._round_facts(db, fid, r)
            if facts is None or facts.state not in ("open", "aligning"):
                return False
            db.execute(
                "UPDATE rounds SET state = 'failed', closed_at = COALESCE(closed_at, ?), published_at = ?, "
                "error = ? WHERE federation_id = ? AND round = ?",
                (now, now, reason[:2000], fid, r),
            )
            # On disk too: `ktl admin check --repair` rebuilds rounds from the files, and would otherwise
            # take a cancelled round with uploads for one whose step is due and run it again.
            ended = {"state": "failed", "error": reason[:2000], "at": now}
            self._write_recorded(db, self.round_dir(fid, r) / ENDED_FILE, json.dumps(ended).encode())
            change = rule(facts) if rule is not None else None
            if change is not None:
                self._apply(db, fid, change)
        with self._lock:
            self._notes.pop((fid, r), None)
        return True
