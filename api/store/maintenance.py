"""What ``ktl admin check`` reads and rebuilds, through the store's schema (it writes no SQL of its own)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ktl.api.schemas import FederationSpec
from ktl.api.store.base import StoreBase
from ktl.api.store.records import (
    ClientRow,
    RestoredRound,
)

logger = logging.getLogger(__name__)


class Maintenance(StoreBase):
    """Reads over every row and the rebuild of a federation from its folder."""

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
