"""The method's server state, one snapshot per round, every file checksummed."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

from ktl.api.store.disk import (
    _fsync_dir,
    _no_space_error,
    is_no_space,
    sha256_file,
)
from ktl.api.store.files import FileChecksums

logger = logging.getLogger(__name__)


class Snapshots(FileChecksums):
    """State snapshots: staged, committed with their checksums, pruned, verified."""

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
