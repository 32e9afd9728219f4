"""Every stored file's SHA-256 and size, recorded when it is written and checked whenever it is read or
served: a damaged file is reported as ``corrupt_file`` naming what it is, never served or loaded."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from ktl.api.store.base import StoreBase
from ktl.api.store.disk import (
    atomic_write,
    describe_file,
    sha256_file,
)
from ktl.api.store.records import (
    FileRecord,
)
from ktl.errors import CorruptFileError

logger = logging.getLogger(__name__)


class FileChecksums(StoreBase):
    """The ``files`` table: a checksum per stored file, checked on every read."""

    @staticmethod
    def _record_file(db: sqlite3.Connection, rel: str, sha256: str, size: int) -> None:
        db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", (rel, sha256, size, time.time()))

    def record_file(self, path: Path | str, sha256: str, size: int) -> None:
        """Record a stored file's checksum (its writer calls this once the file is in place)."""
        with self.transaction() as db:
            self._record_file(db, self.rel(path), sha256, size)

    def forget_files(self, prefix: str) -> int:
        """Delete the rows of files whose relative path starts with ``prefix``; returns how many."""
        with self.transaction() as db:
            return int(
                db.execute("DELETE FROM files WHERE substr(path, 1, ?) = ?", (len(prefix), prefix)).rowcount
            )

    def forget_file(self, path: Path | str) -> bool:
        """Delete one file's checksum row; True if there was one."""
        with self.transaction() as db:
            return db.execute("DELETE FROM files WHERE path = ?", (self.rel(path),)).rowcount > 0

    def file_record(self, path: Path | str) -> FileRecord | None:
        rows = self._query("SELECT * FROM files WHERE path = ?", (self.rel(path),))
        return FileRecord(**dict(rows[0])) if rows else None

    def file_records(self, prefix: str = "") -> list[FileRecord]:
        rows = self._query(
            "SELECT * FROM files WHERE substr(path, 1, ?) = ? ORDER BY path", (len(prefix), prefix)
        )
        return [FileRecord(**dict(r)) for r in rows]

    def _corrupt(self, rel: str, why: str) -> CorruptFileError:
        return CorruptFileError(
            "corrupt_file",
            f"{describe_file(rel)} is damaged on the server's disk ({why}); it is not served. The operator "
            f"can run `ktl admin check` to list damaged files",
            file=rel,
        )

    def _problem(self, rel: str, record: FileRecord | None, data: bytes | None) -> str | None:
        path = self.root / rel
        if record is None:
            return "no checksum recorded"
        if data is None:
            if not path.is_file():
                return "the file is missing"
            digest, size = sha256_file(path)
        else:
            digest, size = hashlib.sha256(data).hexdigest(), len(data)
        if size != record.size:
            return f"{size} bytes instead of the {record.size} written"
        if digest != record.sha256:
            return "its SHA-256 differs from the one recorded when it was written"
        return None

    def file_problem(self, path: Path | str) -> str | None:
        """Why a stored file cannot be trusted (missing, no checksum, wrong size or hash), or None."""
        rel = self.rel(path)
        return self._problem(rel, self.file_record(rel), None)

    def verify_file(self, path: Path | str) -> FileRecord:
        """Check a stored file against its recorded checksum (read in pieces); `CorruptFileError` if it
        is missing, unrecorded or different."""
        rel = self.rel(path)
        record = self.file_record(rel)
        problem = self._problem(rel, record, None)
        if problem is not None or record is None:
            raise self._corrupt(rel, problem or "no checksum recorded")
        return record

    def read_verified(self, path: Path | str) -> bytes:
        """A stored file's bytes, checked against the checksum recorded when it was written;
        `CorruptFileError` (``corrupt_file``, naming the federation / round / file) otherwise."""
        rel = self.rel(path)
        record = self.file_record(rel)
        try:
            data = (self.root / rel).read_bytes()
        except FileNotFoundError:
            raise self._corrupt(rel, "the file is missing") from None
        problem = self._problem(rel, record, data)
        if problem is not None:
            raise self._corrupt(rel, problem)
        return data

    def stored_files(self) -> Iterator[Path]:
        """Every stored file on disk (under ``federations/`` and ``jobs/``), temporaries excluded."""
        for top in ("federations", "jobs"):
            base = self.root / top
            if not base.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not name.startswith("."):
                        yield Path(dirpath) / name

    def unrecorded_files(self) -> list[Path]:
        known = {r[0] for r in self._query("SELECT path FROM files")}
        return [p for p in self.stored_files() if self.rel(p) not in known]

    def record_unrecorded_files(self, paths: list[Path] | None = None) -> list[str]:
        """Hash and record stored files that have no row (trusted as they are now); returns them."""
        todo = self.unrecorded_files() if paths is None else paths
        hashed = [(self.rel(p), *sha256_file(p)) for p in todo if p.is_file()]
        with self.transaction() as db:
            for rel, digest, size in hashed:
                self._record_file(db, rel, digest, size)
        return [rel for rel, _, _ in hashed]

    def _write_recorded(self, db: sqlite3.Connection, path: Path, data: bytes) -> None:
        """Inside a transaction: write a file atomically and record its checksum."""
        digest = atomic_write(path, data)
        self._record_file(db, self.rel(path), digest, len(data))
