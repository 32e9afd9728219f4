"""The database's schema: its tables, the columns added since the first release, and the migration."""

from __future__ import annotations

import logging

from ktl.api.store.base import StoreBase

logger = logging.getLogger(__name__)


DB_NAME = "ktl.sqlite3"


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


class Schema(StoreBase):
    """Creating and migrating the tables; telling whether a database is of this version."""

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
