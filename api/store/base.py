"""What every part of the store shares: the SQLite connection behind one lock, transactions, the
data folder's paths and free space."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ktl.api.store.disk import RETRY_AFTER_S, _no_space_error, is_no_space
from ktl.errors import InsufficientStorageError, NotFoundError

logger = logging.getLogger(__name__)


class StoreBase:
    """The connection, the lock and the data folder; set up by `ktl.api.store.Store`."""

    root: Path
    min_free_bytes: int
    db_path: Path
    _db: sqlite3.Connection
    _lock: threading.RLock
    _notes: dict[tuple[str, int], dict[str, Any]]
    set_aside: dict[str, str]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rollback(self) -> None:
        with suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One SQLite write transaction; SQLITE_FULL becomes `InsufficientStorageError`."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if is_no_space(exc):
                    raise _no_space_error("the change") from None
                raise
            try:
                yield self._db
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, sqlite3.Error) and is_no_space(exc):
                    raise _no_space_error("the change") from None
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                if is_no_space(exc):
                    raise _no_space_error("the change") from None
                raise

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _page(
        self, table: str, after: str | None, limit: int | None, *, newest_first: bool, unknown: NotFoundError
    ) -> list[sqlite3.Row]:
        """Rows of ``table`` (``federations`` or ``jobs``) in creation order — or newest first — that
        follow the row ``after`` (a page's last id; ``unknown`` is raised when it does not exist), at most
        ``limit`` of them. The key (created_at, rowid) makes pages stable while rows are added."""
        sql = f"SELECT * FROM {table}"
        args: tuple[Any, ...] = ()
        if after is not None:
            cursor = self._query(f"SELECT created_at, rowid FROM {table} WHERE id = ?", (after,))
            if not cursor:
                raise unknown
            sql += f" WHERE (created_at, rowid) {'<' if newest_first else '>'} (?, ?)"
            args = (cursor[0][0], cursor[0][1])
        sql += " ORDER BY created_at DESC, rowid DESC" if newest_first else " ORDER BY created_at, rowid"
        if limit is not None:
            sql += " LIMIT ?"
            args += (int(limit),)
        return self._query(sql, args)

    def disk_free_bytes(self) -> int:
        return int(shutil.disk_usage(self.root).free)

    def _check_free_space(self, what: str) -> None:
        if self.min_free_bytes <= 0:
            return
        free = self.disk_free_bytes()
        if free < self.min_free_bytes:
            raise InsufficientStorageError(
                "insufficient_storage",
                f"the server's disk is nearly full ({free} bytes free, below the {self.min_free_bytes} kept "
                f"free): {what} was not stored; try again later",
                headers={"Retry-After": str(RETRY_AFTER_S)},
                retry_after_s=RETRY_AFTER_S,
            )

    def federation_dir(self, fid: str) -> Path:
        return self.root / "federations" / fid

    def round_dir(self, fid: str, r: int) -> Path:
        return self.federation_dir(fid) / "rounds" / str(r)

    def upload_path(self, fid: str, r: int, client_id: str) -> Path:
        return self.round_dir(fid, r) / "uploads" / f"{client_id}.safetensors"

    def state_dir(self, fid: str, r: int) -> Path:
        return self.federation_dir(fid) / "state" / f"round-{r}"

    def job_result_path(self, job_id: str) -> Path:
        return self.root / "jobs" / f"{job_id}.safetensors"

    def rel(self, path: Path | str) -> str:
        """``path`` relative to the data folder, with '/' (the key of the ``files`` table)."""
        p = Path(path)
        try:  # a path built from the root, absolute or relative like the root itself
            return p.relative_to(self.root).as_posix()
        except ValueError:
            if p.is_absolute():
                raise
            return p.as_posix()  # already a key ("federations/…")

    def _small_write(self, sql: str, args: tuple[Any, ...]) -> int:
        """One UPDATE that must get through even on a full disk: on SQLITE_FULL, checkpoint the WAL (its
        space is then reused from the start) and try once more. Returns the rows changed."""
        for attempt in (0, 1):
            try:
                with self.transaction() as db:
                    return int(db.execute(sql, args).rowcount)
            except InsufficientStorageError:
                if attempt:
                    raise
                with self._lock, suppress(sqlite3.Error):
                    self._db.execute("PRAGMA wal_checkpoint(RESTART)")
        return 0  # pragma: no cover - the loop returns or raises
