"""Durable state: SQLite for metadata, safetensors files for tensors, every write atomic and checksummed.

Files are written to a temporary name, fsynced, renamed into place and the folder fsynced; metadata
changes are SQLite transactions (WAL, ``synchronous=FULL``). An upload is acknowledged only after its file
is in place and its row is committed, so a ``kill -9`` at any moment loses nothing that a client was told
was accepted. A file without a row (a crash between the two) is never read.

Every stored file's SHA-256 and size are recorded in the ``files`` table when it is written, and checked
whenever it is read or served (`Store.read_verified`, `Store.verify_file`): a file damaged between
restarts is reported as ``corrupt_file`` naming what it is, never served or loaded. A write that finds the
disk full raises `InsufficientStorageError` (HTTP 507 with ``Retry-After``) and leaves no temporary file.

One module per concern, composed by `Store`: ``base`` (the connection behind one lock, transactions,
paths, free space), ``schema`` (tables, added columns, migration), ``disk`` (atomic writes, disk-full),
``files`` (checksums), ``records`` (typed rows), ``federations`` (and their clients), ``rounds`` (and
uploads, the clients' metrics), ``snapshots`` (the method's state), ``jobs``, ``maintenance`` (what
``ktl admin check`` reads and rebuilds). The store decides nothing about rounds: the round rules
(quorum, deadline, what opens next) are the rounds service's (`ktl.api.services.rounds`), and the store
applies their decisions in the transaction that read the facts.

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

import logging
import os
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

from ktl.api.store.disk import (
    RETRY_AFTER_S,
    STORAGE_PREFIX,
    atomic_write,
    commit_temp,
    describe_file,
    is_no_space,
    sha256_file,
    storage_failure,
    write_temp,
)
from ktl.api.store.federations import FederationRows, unreadable_reason
from ktl.api.store.jobs import JobRows
from ktl.api.store.maintenance import Maintenance
from ktl.api.store.records import (
    ClientRecord,
    ClientRow,
    FederationRecord,
    FileRecord,
    JobRecord,
    MetricSums,
    RestoredRound,
    RestoredUpload,
    RoundChange,
    RoundFacts,
    RoundRecord,
    RoundRule,
    UploadRecord,
    UploadResult,
)
from ktl.api.store.rounds import RoundRows
from ktl.api.store.schema import DB_NAME, FEDERATION_STATES, Schema
from ktl.api.store.snapshots import Snapshots
from ktl.errors import ConfigError

__all__ = [
    "ClientRecord",
    "ClientRow",
    "DB_NAME",
    "FEDERATION_STATES",
    "FederationRecord",
    "FileRecord",
    "JobRecord",
    "MetricSums",
    "RETRY_AFTER_S",
    "RestoredRound",
    "RestoredUpload",
    "RoundChange",
    "RoundFacts",
    "RoundRecord",
    "RoundRule",
    "STORAGE_PREFIX",
    "Store",
    "UploadRecord",
    "UploadResult",
    "atomic_write",
    "commit_temp",
    "describe_file",
    "is_no_space",
    "sha256_file",
    "storage_failure",
    "unreadable_reason",
    "write_temp",
]

logger = logging.getLogger(__name__)


def _has_federation_folders(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else 0


class Store(Schema, FederationRows, RoundRows, Snapshots, JobRows, Maintenance):
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
