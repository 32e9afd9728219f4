"""Durable state: SQLite for metadata, safetensors files for tensors, every write atomic and checksummed.

Files are written to a temporary name, fsynced, renamed into place and the folder fsynced; metadata
changes are SQLite transactions (WAL, ``synchronous=FULL``). An upload is acknowledged only after its file
is in place and its row is committed, so a ``kill -9`` at any moment loses nothing that a client was told
was accepted. A file without a row (a crash between the two) is never read.

Every stored file's SHA-256 and size are recorded in the ``files`` table when it is written, and checked
whenever it is read or served (`Store.read_verified`, `Store.verify_file`): a file damaged between
restarts is reported as ``corrupt_file`` naming what it is, never served or loaded. A write that finds the
disk full raises `InsufficientStorageError` (HTTP 507 with ``Retry-After``) and leaves no temporary file.

Layout under ``data_dir``::

    ktl.sqlite3
    tmp/                                          (temporary files of uploads; emptied at start-up)
    federations/<fid>/spec.json                   (a copy of the federation's spec: `ktl admin check
                                                   --repair` rebuilds a lost database from these)
    federations/<fid>/clients.json                (its clients, tokens as SHA-256 only; ditto)
    federations/<fid>/rounds/<r>/uploads/<client>.safetensors
    federations/<fid>/rounds/<r>/<the method's broadcast file and published files>
                                                  (fedktl: pairs.safetensors, pairs.png, centroids.safetensors, …;
                                                   the table methods: table.safetensors)
    federations/<fid>/state/round-<r>/            (the method's server state after round r, HF-style)
    jobs/<job>.safetensors
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktl.api.schemas import FederationSpec, JobSpec
from ktl.errors import ConfigError, ConflictError, CorruptFileError, InsufficientStorageError, NotFoundError

__all__ = [
    "DB_NAME",
    "ClientRecord",
    "ClientRow",
    "FederationRecord",
    "FileRecord",
    "JobRecord",
    "MetricSums",
    "RoundChange",
    "RoundFacts",
    "RestoredRound",
    "RestoredUpload",
    "RoundRecord",
    "RoundRule",
    "Store",
    "UploadRecord",
    "atomic_write",
    "describe_file",
    "is_no_space",
    "sha256_file",
    "storage_failure",
]

logger = logging.getLogger(__name__)

DB_NAME = "ktl.sqlite3"
RETRY_AFTER_S = 30
STORAGE_PREFIX = "insufficient_storage:"  # how a round that failed for lack of space says so in its error
FEDERATION_STATES = ("active", "paused")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS federations (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, etf_seed INTEGER NOT NULL,
    current_round INTEGER NOT NULL, created_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'active');
CREATE TABLE IF NOT EXISTS clients (
    id TEXT PRIMARY KEY, federation_id TEXT NOT NULL REFERENCES federations(id), name TEXT,
    token_hash TEXT NOT NULL UNIQUE, active INTEGER NOT NULL DEFAULT 1, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    federation_id TEXT NOT NULL REFERENCES federations(id), round INTEGER NOT NULL, state TEXT NOT NULL,
    opened_at REAL NOT NULL, deadline_at REAL NOT NULL, closed_at REAL, published_at REAL,
    error TEXT, stats TEXT, attempts INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (federation_id, round));
CREATE INDEX IF NOT EXISTS rounds_by_state ON rounds(state);
CREATE TABLE IF NOT EXISTS uploads (
    federation_id TEXT NOT NULL, round INTEGER NOT NULL, client_id TEXT NOT NULL REFERENCES clients(id),
    digest TEXT NOT NULL, num_rows INTEGER NOT NULL, bytes INTEGER NOT NULL, received_at REAL NOT NULL,
    metrics TEXT, PRIMARY KEY (federation_id, round, client_id));
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, total INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    error TEXT, restarts INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, written_at REAL NOT NULL);
"""

_TABLES = ("federations", "clients", "rounds", "uploads", "jobs", "files")

# Columns added after the first release: (table, column, its definition for ALTER TABLE … ADD COLUMN).
_ADDED_COLUMNS = (
    ("federations", "state", "TEXT NOT NULL DEFAULT 'active'"),
    ("rounds", "attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("uploads", "metrics", "TEXT"),  # the client's evaluation sent with the upload (JSON), or NULL
)


# -- disk-full handling ------------------------------------------------------------------------------------


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the quota) is full: an OSError ENOSPC / EDQUOT, SQLite's
    SQLITE_FULL, or a library's wrapped form of either (e.g. safetensors' ``StorageFull``)."""
    if isinstance(exc, InsufficientStorageError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return True
    text = str(exc)
    return any(s in text for s in ("No space left on device", "StorageFull", "database or disk is full"))


def _no_space_error(what: str) -> InsufficientStorageError:
    return InsufficientStorageError(
        "insufficient_storage",
        f"the server's disk is full: {what} was not stored; try again later",
        headers={"Retry-After": str(RETRY_AFTER_S)},
        retry_after_s=RETRY_AFTER_S,
    )


def storage_failure(error: str) -> str:
    """A round's error text, starting with ``insufficient_storage:`` when it says the disk was full."""
    if error.startswith(STORAGE_PREFIX):
        return error
    if (
        error.startswith("InsufficientStorageError:")
        or is_no_space(Exception(error))
        or "[Errno 28]" in error
    ):
        return f"{STORAGE_PREFIX} the disk was full during the server step ({error})"
    return error


# -- files --------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and size of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _ensure_dir(path: Path) -> None:
    """Create ``path`` and its missing parents, each made durable (the parent folder fsynced)."""
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            if is_no_space(exc):
                raise _no_space_error(f"folder {folder.name}") from None
            raise
        _fsync_dir(folder.parent)


def write_temp(path: Path, data: bytes, tmp_dir: Path | None = None) -> Path:
    """Write ``data`` to a fresh fsynced temporary file (in ``tmp_dir``, else beside ``path``); returns its
    path. On a full disk raises `InsufficientStorageError` and leaves nothing behind."""
    folder = tmp_dir or path.parent
    tmp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and is_no_space(exc):
            raise _no_space_error(path.name) from None
        raise
    return tmp


def commit_temp(tmp: Path, path: Path) -> None:
    """Rename a `write_temp` file into place and make the rename durable."""
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes) -> str:
    """Write a whole file or nothing: temporary file, fsync, rename, fsync of the folder. Returns the
    data's SHA-256 (hex)."""
    commit_temp(write_temp(path, data), path)
    return hashlib.sha256(data).hexdigest()


def describe_file(rel: str) -> str:
    """What a stored file is, for people: ``pairs.safetensors of federation fed-… round 3``."""
    parts = rel.split("/")
    stem = Path(rel).name.removesuffix(".safetensors")
    if parts[0] == "federations" and len(parts) >= 3:
        fid = parts[1]
        if parts[2] == "rounds" and len(parts) >= 5:
            if parts[4] == "uploads" and len(parts) == 6:
                return f"the upload of client {stem} to federation {fid} round {parts[3]}"
            return f"{'/'.join(parts[4:])} of federation {fid} round {parts[3]}"
        if parts[2] == "state" and len(parts) >= 4:
            after = parts[3].removeprefix("round-")
            return (
                f"the method's state snapshot after round {after} of federation {fid} ({'/'.join(parts[4:])})"
            )
        return f"{'/'.join(parts[2:])} of federation {fid}"
    if parts[0] == "jobs" and len(parts) == 2:
        return f"the result of job {stem}"
    return rel


# -- records ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FederationRecord:
    id: str
    spec: FederationSpec
    etf_seed: int
    current_round: int
    created_at: float
    state: str = "active"  # 'active' | 'paused'


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
    attempts: int = 0


@dataclass(frozen=True)
class UploadRecord:
    federation_id: str
    round: int
    client_id: str
    digest: str
    num_rows: int
    bytes: int
    received_at: float
    metrics: str | None = None  # the client's evaluation sent with it (`ktl.api.services.evaluation`)


@dataclass(frozen=True)
class MetricSums:
    """One metric of one round, summed over the uploads that reported it (see `Store.metric_sums`)."""

    round: int
    name: str
    clients: int
    n_samples: int
    weighted_sum: float  # Σ n·v over those uploads (n: the samples each client measured on)
    weighted_squares: float  # Σ n·v²
    min: float
    max: float


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
class FileRecord:
    path: str  # relative to the data folder, with '/'
    sha256: str
    size: int
    written_at: float


@dataclass(frozen=True)
class UploadResult:
    duplicate: bool
    uploads: int
    state: str
    closed: bool  # this upload completed the quorum and closed the round


@dataclass(frozen=True)
class ClientRow:
    """A client as ``clients.json`` keeps it (its token as SHA-256 only), for `Store.restore_federation`."""

    id: str
    name: str | None
    token_hash: str
    active: bool
    created_at: float


@dataclass(frozen=True)
class RestoredUpload:
    client_id: str
    digest: str
    num_rows: int
    bytes: int
    received_at: float


@dataclass(frozen=True)
class RestoredRound:
    """A round as `ktl admin check --repair` rebuilds it from the files on disk."""

    round: int
    state: str
    opened_at: float
    deadline_at: float
    closed_at: float | None
    published_at: float | None
    error: str | None
    uploads: list[RestoredUpload]


@dataclass(frozen=True)
class RoundFacts:
    """What the round rules look at, read inside the transaction that applies their decision."""

    federation_id: str
    round: int
    state: str
    deadline_at: float
    uploads: int
    current_round: int


@dataclass(frozen=True)
class RoundChange:
    """A decision of the round rules (`ktl.api.services.rounds`), applied by the store in the transaction
    that read the facts: round ``close`` goes 'aligning' (closed at ``at``); round ``open`` opens at ``at``
    with its deadline and becomes the federation's current round."""

    at: float
    close: int | None = None
    open: int | None = None
    deadline_at: float | None = None


# The round rules, as the store calls them: the facts of a round → what changes (None: nothing).
RoundRule = Callable[[RoundFacts], RoundChange | None]


def unreadable_reason(exc: ValueError) -> str:
    """One line saying why a stored spec cannot be read: the first failing field and the error."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "spec"
        return f"{where}: {first['msg']}"
    return str(exc).splitlines()[0]


def _has_federation_folders(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else 0


class Store:
    """All reads and writes of server state. Thread-safe: one connection behind a lock.

    Parameters
    ----------
    root
        The data folder.
    min_free_bytes
        An upload is refused (507) while the disk has less free space than this, keeping room for the
        server's own writes (state snapshots, published files, SQLite).
    rebuild
        Open even though the database is missing beside existing federation folders (for
        ``ktl admin check --repair``, which then rebuilds it); the server never sets it.
    maintenance
        Leave the folder as it is: no clean-up of leftovers, no migration (for ``ktl admin check``).
    """

    def __init__(
        self, root: Path, *, min_free_bytes: int = 0, rebuild: bool = False, maintenance: bool = False
    ) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.db_path = self.root / DB_NAME
        self._lock = threading.RLock()
        self._notes: dict[tuple[str, int], dict[str, Any]] = {}
        # Federations whose stored row cannot be read (a spec an older server stored, e.g. a float it
        # wrote as null): id → why. They are left out of lookups and listings instead of failing them.
        self.set_aside: dict[str, str] = {}
        fed_dir = self.root / "federations"
        missing = not self.db_path.exists()
        wal = Path(f"{self.db_path}-wal")
        fresh = missing or (self.db_path.stat().st_size == 0 and not wal.exists())
        if fresh and not rebuild and (n := _has_federation_folders(fed_dir)):
            what = "is missing" if missing else "is empty"
            raise ConfigError(
                f"{self.db_path} {what} but {fed_dir} holds {n} federation folder(s); refusing to start with "
                f"an empty database (their tokens would stop working): restore {DB_NAME} from a backup, or "
                f"run `ktl admin check --data-dir {self.root} --repair` to rebuild it from those folders"
            )
        if missing and not maintenance:
            for suffix in ("-wal", "-shm"):  # a log without its database cannot be replayed onto a new one
                Path(f"{self.db_path}{suffix}").unlink(missing_ok=True)
        if not maintenance:
            self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open {self.db_path}: {exc}") from None
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            check = self._db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(str(check[0]) if check else "quick_check found problems")
            if not maintenance:
                self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if is_no_space(exc):
                raise ConfigError(f"the disk holding {self.db_path} is full: free some space") from None
            raise ConfigError(
                f"{self.db_path} is not a usable SQLite database ({exc}): restore it from a backup, or run "
                f"`ktl admin check --data-dir {self.root} --repair` to move it aside and rebuild it from "
                f"{fed_dir}"
            ) from None
        if not maintenance:
            self._remove_leftovers()
            (self.root / "tmp").mkdir(exist_ok=True)
            for row in self._query("SELECT * FROM federations ORDER BY created_at, rowid"):
                self._federation(row)  # sets aside (and logs) every row that cannot be read

    def _migrate(self) -> None:
        """Create missing tables and add columns that older databases lack; a database that predates
        checksums gets them for the files it already holds (trusted as they are now)."""
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self._db.executescript(_SCHEMA)
        for table, column, definition in _ADDED_COLUMNS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        if "federations" in tables and "files" not in tables:
            recorded = self.record_unrecorded_files()
            if recorded:
                logger.info("recorded the checksums of %d existing files", len(recorded))

    def _remove_leftovers(self) -> None:
        """Delete what a crash can leave behind: temporary files and staged state folders (never read),
        and finish deleting federations whose deletion was committed."""
        for pattern in (".*.tmp", ".*.partial"):
            for path in self.root.rglob(pattern):
                path.unlink(missing_ok=True)
        for path in self.root.glob("federations/*/state/.staging-*"):
            shutil.rmtree(path, ignore_errors=True)
        tmp = self.root / "tmp"
        if tmp.is_dir():
            for path in tmp.iterdir():
                if path.is_dir() and path.name.startswith("deleted-"):
                    fid = path.name.removeprefix("deleted-").rsplit("-", 1)[0]
                    target = self.root / "federations" / fid
                    if self.get_federation(fid) is not None and not target.exists():  # never committed
                        os.replace(path, target)
                        continue
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

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

    # -- paths ------------------------------------------------------------------------------------

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

    # -- file checksums -------------------------------------------------------------------------------

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

    # -- federations and clients --------------------------------------------------------------------

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
        sql = "SELECT * FROM federations"
        args: tuple[Any, ...] = ()
        if after is not None:
            cursor = self._query("SELECT created_at, rowid FROM federations WHERE id = ?", (after,))
            if not cursor:
                raise NotFoundError("unknown_federation", f"no federation {after!r} to list after")
            sql += " WHERE (created_at, rowid) > (?, ?)"
            args = (cursor[0][0], cursor[0][1])
        sql += " ORDER BY created_at, rowid"
        if limit is not None:
            sql += " LIMIT ?"
            args += (int(limit),)
        return [fed for r in self._query(sql, args) if (fed := self._federation(r)) is not None]

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
        self._notes = {k: v for k, v in self._notes.items() if k[0] != fid}
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
            change = rule(facts) if rule is not None else None
            if change is not None:
                self._apply(db, fid, change)
        with self._lock:
            self._notes.pop((fid, r), None)
        return True

    # -- the method's server state, one snapshot per round ----------------------------------------------

    def commit_state(self, fid: str, r: int, staged: Path, keep: int) -> None:
        """Move a staged state folder into place as the snapshot after round ``r``, recording the checksum
        of every file in it; prune old snapshots (and their rows)."""
        final = self.state_dir(fid, r)
        hashed = []
        for f in sorted(staged.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                hashed.append((f.relative_to(staged).as_posix(), *sha256_file(f)))
        if final.exists():  # a previous attempt at this round crashed after saving
            shutil.rmtree(final)
        os.replace(staged, final)
        _fsync_dir(final.parent)
        prefix = self.rel(final) + "/"
        snapshots = sorted(self.state_snapshots(fid))
        pruned = snapshots[:-keep]
        with self.transaction() as db:
            db.execute("DELETE FROM files WHERE substr(path, 1, ?) = ?", (len(prefix), prefix))
            for name, digest, size in hashed:
                self._record_file(db, prefix + name, digest, size)
            for old in pruned:
                old_prefix = self.rel(self.state_dir(fid, old)) + "/"
                db.execute("DELETE FROM files WHERE substr(path, 1, ?) = ?", (len(old_prefix), old_prefix))
        for old in pruned:
            shutil.rmtree(self.state_dir(fid, old), ignore_errors=True)

    def state_snapshots(self, fid: str) -> list[int]:
        folder = self.federation_dir(fid) / "state"
        if not folder.is_dir():
            return []
        return [int(p.name.removeprefix("round-")) for p in folder.iterdir() if p.name.startswith("round-")]

    def snapshot_problem(self, fid: str, r: int) -> str | None:
        """Why the state snapshot after round ``r`` cannot be trusted (a file missing, damaged or without
        a checksum), or None."""
        folder = self.state_dir(fid, r)
        prefix = self.rel(folder) + "/"
        records = {rec.path: rec for rec in self.file_records(prefix)}
        if not records:
            return "no checksums recorded for it"
        for rel, rec in records.items():
            problem = self._problem(rel, rec, None)
            if problem is not None:
                return f"{rel.removeprefix(prefix)}: {problem}"
        for f in sorted(folder.rglob("*")):
            if f.is_file() and self.rel(f) not in records:
                return f"{f.relative_to(folder).as_posix()}: no checksum recorded"
        return None

    def latest_valid_state(
        self, fid: str, before_round: int, *, skipped: list[tuple[int, str]] | None = None
    ) -> tuple[int, Path] | None:
        """The newest state snapshot before ``before_round`` whose files all match their checksums, as
        (its round, its folder); damaged ones are skipped (logged, and appended to ``skipped`` as
        (round, why)). None when no snapshot is valid."""
        for s in sorted((x for x in self.state_snapshots(fid) if x < before_round), reverse=True):
            problem = self.snapshot_problem(fid, s)
            if problem is None:
                return s, self.state_dir(fid, s)
            logger.warning("%s: skipping the method's state snapshot after round %d: %s", fid, s, problem)
            if skipped is not None:
                skipped.append((s, problem))
        return None

    def staging_dir(self, fid: str) -> Path:
        path = self.federation_dir(fid) / "state" / f".staging-{secrets.token_hex(4)}"
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            if is_no_space(exc):
                raise _no_space_error("the method's state") from None
            raise
        return path

    # -- what ktl admin check reads and rebuilds ---------------------------------------------------------

    def schema_is_current(self) -> bool:
        """Whether the database has every table and added column of this version (`_SCHEMA`,
        `_ADDED_COLUMNS`); an older one is migrated when a server opens it."""
        tables = {r[0] for r in self._query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not set(_TABLES) <= tables:
            return False
        return all(
            column in {r[1] for r in self._query(f"PRAGMA table_info({table})")}
            for table, column, _ in _ADDED_COLUMNS
        )

    def federation_specs(self) -> dict[str, str]:
        """Every federation's stored spec as it is in its row (JSON text, unparsed): id → spec."""
        return {
            r[0]: r[1] for r in self._query("SELECT id, spec FROM federations ORDER BY created_at, rowid")
        }

    def upload_keys(self) -> list[tuple[str, int, str]]:
        """(federation, round, client) of every upload row."""
        return [
            (r[0], int(r[1]), r[2])
            for r in self._query("SELECT federation_id, round, client_id FROM uploads")
        ]

    def published_rounds(self) -> list[tuple[str, int]]:
        """(federation, round) of every published round."""
        return [
            (r[0], int(r[1]))
            for r in self._query("SELECT federation_id, round FROM rounds WHERE state = 'published'")
        ]

    def finished_jobs(self) -> list[str]:
        """The ids of the jobs whose result is written (state 'done')."""
        return [r[0] for r in self._query("SELECT id FROM jobs WHERE state = 'done'")]

    def forget_file(self, path: Path | str) -> bool:
        """Delete one file's checksum row; True if there was one."""
        with self.transaction() as db:
            return db.execute("DELETE FROM files WHERE path = ?", (self.rel(path),)).rowcount > 0

    def restore_federation(
        self,
        fid: str,
        spec: FederationSpec,
        etf_seed: int,
        created_at: float,
        clients: list[ClientRow],
        plan: Callable[[set[str]], tuple[list[RestoredRound], int]],
    ) -> None:
        """Write a federation's rows as `ktl admin check --repair` rebuilds them from its folder, in one
        transaction: its row, its clients (one whose id or token another already holds is skipped), then
        the rounds and uploads ``plan`` makes of the clients written (their ids), and its current round."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO federations (id, spec, etf_seed, current_round, created_at, state) "
                "VALUES (?, ?, ?, 1, ?, 'active')",
                (fid, spec.model_dump_json(), etf_seed, created_at),
            )
            written: set[str] = set()
            for c in clients:
                added = db.execute(
                    "INSERT OR IGNORE INTO clients (id, federation_id, name, token_hash, active, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (c.id, fid, c.name, c.token_hash, int(c.active), c.created_at),
                )
                if added.rowcount > 0:
                    written.add(c.id)
            rounds, current = plan(written)
            for rnd in rounds:
                db.execute(
                    "INSERT INTO rounds (federation_id, round, state, opened_at, deadline_at, closed_at, "
                    "published_at, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        fid,
                        rnd.round,
                        rnd.state,
                        rnd.opened_at,
                        rnd.deadline_at,
                        rnd.closed_at,
                        rnd.published_at,
                        rnd.error,
                    ),
                )
                for u in rnd.uploads:  # the clients' metrics are not on disk: not rebuilt
                    db.execute(
                        "INSERT INTO uploads (federation_id, round, client_id, digest, num_rows, bytes, "
                        "received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (fid, rnd.round, u.client_id, u.digest, u.num_rows, u.bytes, u.received_at),
                    )
            db.execute("UPDATE federations SET current_round = ? WHERE id = ?", (current, fid))

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

    def list_jobs(self, limit: int, before: str | None = None) -> list[JobRecord]:
        """Jobs newest first; ``limit`` of them older than the job ``before`` (a page's last id;
        `NotFoundError` if it does not exist)."""
        sql = "SELECT * FROM jobs"
        args: tuple[Any, ...] = ()
        if before is not None:
            cursor = self._query("SELECT created_at, rowid FROM jobs WHERE id = ?", (before,))
            if not cursor:
                raise NotFoundError("unknown_job", f"no job {before!r} to list after")
            sql += " WHERE (created_at, rowid) < (?, ?)"
            args = (cursor[0][0], cursor[0][1])
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        return [self._job(r) for r in self._query(sql, (*args, int(limit)))]

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
