"""Batch generation jobs: their rows and results."""

from __future__ import annotations

import logging
import secrets
import sqlite3
from typing import Any

from ktl.api.schemas import JobSpec
from ktl.api.store.disk import (
    sha256_file,
)
from ktl.api.store.files import FileChecksums
from ktl.api.store.records import (
    JobRecord,
)
from ktl.errors import NotFoundError

logger = logging.getLogger(__name__)


class JobRows(FileChecksums):
    """The ``jobs`` table."""

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

    def delete_job(self, job_id: str, *, only_if: tuple[str, ...]) -> bool:
        """Delete a job in one of the states ``only_if``: its row, its result file and the file's checksum
        row. True if it was deleted."""
        path = self.job_result_path(job_id)
        with self.transaction() as db:
            marks = ",".join("?" * len(only_if))
            gone = db.execute(f"DELETE FROM jobs WHERE id = ? AND state IN ({marks})", (job_id, *only_if))
            if gone.rowcount == 0:
                return False
            db.execute("DELETE FROM files WHERE path = ?", (self.rel(path),))
        path.unlink(missing_ok=True)  # after the commit: a crash before it keeps the job whole
        return True

    def jobs_finished_before(self, cutoff: float) -> list[str]:
        """Ids of the jobs that finished (done, failed, cancelled) before ``cutoff``."""
        rows = self._query(
            "SELECT id FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND finished_at < ?",
            (cutoff,),
        )
        return [str(r[0]) for r in rows]

    def jobs_in_states(self, *states: str) -> list[JobRecord]:
        marks = ",".join("?" * len(states))
        return [
            self._job(r)
            for r in self._query(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at", states)
        ]

    def list_jobs(self, limit: int, before: str | None = None) -> list[JobRecord]:
        """Jobs newest first; ``limit`` of them older than the job ``before`` (a page's last id;
        `NotFoundError` if it does not exist)."""
        unknown = NotFoundError("unknown_job", f"no job {before!r} to list after")
        return [self._job(r) for r in self._page("jobs", before, limit, newest_first=True, unknown=unknown)]

    def update_job(self, job_id: str, *, only_if: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Set columns of a job; with ``only_if``, only while its state is one of those. True if it changed.

        Setting a job 'done' records its result file's checksum, unless its writer already did."""
        result: tuple[str, str, int] | None = None
        if fields.get("state") == "done":
            path = self.job_result_path(job_id)
            if path.is_file() and self.file_record(path) is None:
                result = (self.rel(path), *sha256_file(path))
        sets = ", ".join(f"{k} = ?" for k in fields)
        sql = f"UPDATE jobs SET {sets} WHERE id = ?"
        args: tuple[Any, ...] = (*fields.values(), job_id)
        if only_if:
            sql += f" AND state IN ({','.join('?' * len(only_if))})"
            args += only_if
        with self.transaction() as db:
            changed = db.execute(sql, args).rowcount > 0
            if changed and result is not None:
                self._record_file(db, *result)
            return changed
