"""``ktl admin check``: verify a data folder against its database, and with ``--repair`` rebuild what can be.

Checked: the database opens and is intact; every row of the ``files`` table matches the file on disk
(present, same size, same SHA-256); every stored file has a row; every upload row, published round, state
snapshot and finished job has its files; every federation folder has its row (and its ``spec.json``).

``--repair`` (run it with the server stopped) rebuilds:

- a missing or unreadable ``ktl.sqlite3`` (an unreadable one is moved aside first) from the federation
  folders: each federation from its ``spec.json``, its clients (tokens included, kept as hashes) from its
  ``clients.json``, its rounds and uploads from the files on disk;
- the checksum of every stored file that has none (trusted as it is now);
- rows of files that are gone and that nothing refers to (e.g. pruned snapshots) are deleted;
- a missing ``spec.json`` / ``clients.json`` is written again from the database.

It cannot rebuild: damaged or missing file contents (uploads, published files, snapshots, job results —
restore them from a backup), the jobs table (job specs are not kept on disk), round stats and timings, the
federations' paused state, and the clients of a federation without a ``clients.json``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ktl.api.lock import DataDirLock
from ktl.api.schemas import FederationSpec
from ktl.api.store import (
    DB_NAME,
    ClientRow,
    RestoredRound,
    RestoredUpload,
    Store,
    describe_file,
    sha256_file,
    unreadable_reason,
)
from ktl.api.store.rounds import ENDED_FILE
from ktl.errors import KtlError

__all__ = ["CheckReport", "Finding", "check_data_dir"]


@dataclass(frozen=True)
class Finding:
    """``kind``: 'problem' (found, not repaired), 'repaired', 'unrepairable' or 'note' (harmless)."""

    kind: str
    subject: str
    message: str


@dataclass
class CheckReport:
    data_dir: Path
    repair: bool
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing wrong is left (problems found by a check, or that a repair could not fix)."""
        return not any(f.kind in ("problem", "unrepairable") for f in self.findings)

    def note(self, subject: str, message: str) -> None:
        self.findings.append(Finding("note", subject, message))

    def issue(
        self,
        subject: str,
        message: str,
        *,
        repair: Callable[[], str] | None = None,
        would: str = "",
        cannot: str = "",
    ) -> None:
        """Something wrong: repaired now (``repair`` returns what it did), or reported with what
        ``--repair`` would do (``would``), or why it cannot be repaired (``cannot``)."""
        if repair is None:
            kind = "unrepairable" if self.repair else "problem"
            self.findings.append(Finding(kind, subject, f"{message}; cannot be repaired: {cannot}"))
        elif self.repair:
            self.findings.append(Finding("repaired", subject, f"{message}; repaired: {repair()}"))
        else:
            self.findings.append(Finding("problem", subject, f"{message} (--repair {would})"))

    def render(self) -> str:
        lines = [f"ktl admin check {self.data_dir}{' --repair' if self.repair else ''}"]
        if self.checked:
            lines.append("checked: " + ", ".join(f"{n} {what}" for what, n in self.checked.items()))
        titles = {
            "problem": "PROBLEMS",
            "unrepairable": "CANNOT BE REPAIRED",
            "repaired": "REPAIRED",
            "note": "notes",
        }
        for kind, title in titles.items():
            found = [f for f in self.findings if f.kind == kind]
            if found:
                lines.append(f"{title} ({len(found)}):")
                lines.extend(f"  {f.subject}: {f.message}" for f in found)
        problems = sum(f.kind == "problem" for f in self.findings)
        unrepairable = sum(f.kind == "unrepairable" for f in self.findings)
        repaired = sum(f.kind == "repaired" for f in self.findings)
        if self.ok:
            lines.append(f"OK: repaired {repaired} problem(s)" if repaired else "OK: no problems found")
        elif self.repair:
            lines.append(f"NOT OK: repaired {repaired}, {unrepairable} cannot be repaired (see above)")
        else:
            fixable = sum(f.kind == "problem" and "(--repair " in f.message for f in self.findings)
            lines.append(
                f"NOT OK: {problems} problem(s); --repair can fix {fixable} of them (stop the server first)"
            )
        return "\n".join(lines) + "\n"


# -- what damage means, per kind of file ---------------------------------------------------------------------


def _consequence(rel: str) -> str:
    parts = rel.split("/")
    if len(parts) >= 3 and parts[2] == "state":
        return "restore it from a backup; meanwhile the server skips this snapshot for the one before it"
    if len(parts) == 6 and parts[4] == "uploads":
        return "restore it from a backup; the round cannot be computed again with it"
    if len(parts) >= 5 and parts[2] == "rounds":
        return "restore it from a backup; clients asking for it get 500 corrupt_file"
    if parts[0] == "jobs":
        return "restore it from a backup, or submit the job again"
    return "restore it from a backup"


def _leftovers(root: Path) -> list[Path]:
    found = [p for pattern in (".*.tmp", ".*.partial") for p in root.rglob(pattern)]
    found += list(root.glob("federations/*/state/.staging-*"))
    tmp = root / "tmp"
    if tmp.is_dir():
        found += list(tmp.iterdir())
    return found


def _federation_folders(root: Path) -> list[str]:
    folder = root / "federations"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


# -- opening the database -----------------------------------------------------------------------------------


def _open(root: Path, report: CheckReport) -> Store | None:
    """The store to check, after repairing the database itself where asked; None if nothing to check."""
    db = root / DB_NAME
    folders = _federation_folders(root)
    if not db.exists():
        if not folders:
            report.note(DB_NAME, "no database and no federation folders: an empty data folder")
            return None
        store: Store | None = None

        def rebuild() -> str:
            nonlocal store
            store = Store(root, rebuild=True)
            return _rebuild(store, report)

        report.issue(
            DB_NAME,
            f"the database is missing but {len(folders)} federation folder(s) are on disk",
            repair=rebuild,
            would="rebuilds it from the folders' spec.json, clients.json and files",
        )
        return store
    try:
        store = Store(root, maintenance=True)
    except KtlError as exc:
        broken = str(exc).split(": restore ")[0].split("; refusing ")[0]

        def move_aside_and_rebuild() -> str:
            nonlocal store
            aside = db.with_name(f"{DB_NAME}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(db, aside)
            for suffix in ("-wal", "-shm"):
                log = Path(f"{db}{suffix}")
                if log.exists():
                    os.replace(log, Path(f"{aside}{suffix}"))
            store = Store(root, rebuild=True)
            return f"moved it to {aside.name}; " + _rebuild(store, report)

        store = None
        report.issue(
            DB_NAME,
            f"the database cannot be used: {broken}",
            repair=move_aside_and_rebuild,
            would="moves it aside and rebuilds it from the federation folders",
        )
        return store
    if not store.schema_is_current():
        store.close()

        def migrate() -> str:
            nonlocal store
            store = Store(root)
            return "migrated the schema; recorded the checksums of the files as they are now"

        store = None
        report.issue(
            DB_NAME,
            "the database predates file checksums (or lacks a column the server adds)",
            repair=migrate,
            would="migrates it and records the checksums of the files as they are now "
            "(starting the server does the same)",
        )
        return store
    if report.repair:
        store.close()
        leftovers = _leftovers(root)
        store = Store(root)  # its start-up removes what a crash left behind
        if leftovers:
            report.findings.append(
                Finding("repaired", "temporary files", f"removed {len(leftovers)} left by a crash")
            )
    return store


# -- rebuilding the database from the folders ----------------------------------------------------------------


def _rows_of(path: Path) -> int:
    """Rows of an upload (the first dimension of its first tensor), read from the safetensors header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        names = [k for k in ("prototypes", *header) if k in header and k != "__metadata__"]
        return int(header[names[0]]["shape"][0]) if names else 0
    except (OSError, ValueError, KeyError, IndexError, struct.error):
        return 0


def _digest_rows_size(path: Path) -> tuple[str, int, int, float]:
    """An upload file's SHA-256, rows, size and time (what its row held)."""
    digest, size = sha256_file(path)
    return digest, _rows_of(path), size, path.stat().st_mtime


def _damage(path: Path) -> str | None:
    """Why a file with no checksum is visibly damaged (a safetensors file whose header does not match
    its size, JSON that does not parse, a PNG cut short), or None: such a file is never trusted."""
    try:
        if path.suffix == ".safetensors":
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return "shorter than a safetensors header"
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    return "its safetensors header runs past the end of the file"
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end != size:
                return f"its safetensors header describes {8 + n + end} bytes, the file has {size}"
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            data = path.read_bytes()
            if not data.startswith(b"\x89PNG\r\n\x1a\n") or b"IEND" not in data[-12:]:
                return "not a complete PNG file"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        return f"unreadable ({exc})"
    return None


def _rebuild(store: Store, report: CheckReport) -> str:
    """Rows for every federation folder, then checksums for every stored file; returns a summary."""
    rebuilt = 0
    for fid in _federation_folders(store.root):
        if store.get_federation(fid) is None and _rebuild_federation(store, fid, report):
            rebuilt += 1
    orphans = {store.rel(p) for p in _orphan_uploads(store)}
    trusted = []
    for path in store.unrecorded_files():
        rel = store.rel(path)
        if rel in orphans:
            continue
        if (damage := _damage(path)) is not None:
            report.findings.append(
                Finding("unrepairable", rel, f"{describe_file(rel)}: {damage}; {_consequence(rel)}")
            )
            continue
        trusted.append(path)
    recorded = store.record_unrecorded_files(trusted)
    jobs = list((store.root / "jobs").glob("*.safetensors"))
    if jobs:
        report.findings.append(
            Finding(
                "unrepairable",
                "jobs",
                f"{len(jobs)} job result file(s) in jobs/ but the jobs themselves (spec, state) are kept "
                "only in the database: they cannot be rebuilt; the files stay, unserved",
            )
        )
    report.note(
        DB_NAME,
        "rebuilt rounds have no stats or exact timings, and every federation is 'active' (not kept on disk)",
    )
    return f"rebuilt {rebuilt} federation(s) and the checksums of {len(recorded)} file(s)"


def _rebuild_federation(store: Store, fid: str, report: CheckReport) -> bool:
    folder = store.federation_dir(fid)
    subject = f"federations/{fid}"
    try:
        copy = json.loads((folder / "spec.json").read_text())
        spec = FederationSpec.model_validate(copy["spec"])
        etf_seed, created_at = int(copy["etf_seed"]), float(copy["created_at"])
    except FileNotFoundError:
        report.findings.append(
            Finding(
                "unrepairable",
                subject,
                "no spec.json (created before specs were kept on disk): the federation cannot be rebuilt; "
                "its files stay on disk, unused",
            )
        )
        return False
    except (ValueError, KeyError, TypeError) as exc:
        report.findings.append(Finding("unrepairable", subject, f"spec.json is unreadable ({exc})"))
        return False
    clients: list[dict[str, object]] | None = None
    try:
        clients = json.loads((folder / "clients.json").read_text())
    except FileNotFoundError:
        pass
    except ValueError as exc:
        report.findings.append(Finding("unrepairable", subject, f"clients.json is unreadable ({exc})"))
    known: set[str] = set()  # the clients rebuilt (one whose id or token is taken already is not)
    broadcast = spec.method_class.broadcast_file
    rounds: dict[int, tuple[list[Path], Path | None]] = {}
    ended: dict[int, str] = {}  # rounds cancelled (ENDED_FILE): they stay failed, never run again
    rounds_dir = folder / "rounds"
    if rounds_dir.is_dir():
        for d in rounds_dir.iterdir():
            if d.is_dir() and d.name.isdigit():
                uploads = sorted((d / "uploads").glob("*.safetensors")) if (d / "uploads").is_dir() else []
                rounds[int(d.name)] = (uploads, d / broadcast if (d / broadcast).is_file() else None)
                if (d / ENDED_FILE).is_file():
                    try:
                        ended[int(d.name)] = str(json.loads((d / ENDED_FILE).read_text())["error"])
                    except (ValueError, KeyError, TypeError):
                        ended[int(d.name)] = "ended (rebuilt by ktl admin check --repair)"
    now = time.time()
    last = max(rounds, default=0)
    lost: list[str] = []

    current = last + 1

    def plan(written: set[str]) -> tuple[list[RestoredRound], int]:
        """The rounds from the files on disk, counting the uploads of the clients rebuilt (``written``)."""
        nonlocal current
        known.update(written)
        restored = []
        state_of_last = "open"
        for r in range(1, last + 1):
            uploads, published = rounds.get(r, ([], None))
            counted = [u for u in uploads if u.stem in known and _damage(u) is None]
            lost.extend(store.rel(u) for u in uploads if u not in counted)
            closed_at: float | None = now
            published_at = None
            error = None
            if published is not None:
                state, published_at = "published", published.stat().st_mtime
                closed_at = published_at
            elif r in ended:  # cancelled: it stays so (its uploads are kept, its step never runs)
                state, error, published_at = "failed", ended[r], now
            elif r < last:
                state = "aligning" if counted else "failed"
                if not counted:
                    error = "rebuilt by ktl admin check --repair: no uploads or published files on disk"
            else:
                state = "aligning" if len(counted) >= spec.quorum else "open"
                closed_at = None if state == "open" else now
            state_of_last = state
            restored.append(
                RestoredRound(
                    r,
                    state,
                    now,
                    now + spec.round_deadline_s,
                    closed_at,
                    published_at,
                    error,
                    [RestoredUpload(u.stem, *_digest_rows_size(u)) for u in counted],
                )
            )
        current = last if last and state_of_last == "open" else last + 1
        if current == last + 1:
            restored.append(
                RestoredRound(current, "open", now, now + spec.round_deadline_s, None, None, None, [])
            )
        return restored, current

    try:
        rows = [
            ClientRow(
                str(c["id"]),
                None if c.get("name") is None else str(c.get("name")),
                str(c["token_hash"]),
                bool(c.get("active", True)),
                float(c["created_at"]),  # type: ignore[arg-type]
            )
            for c in clients or []
        ]
        store.restore_federation(fid, spec, etf_seed, created_at, rows, plan)
    except (KeyError, TypeError, AttributeError, ValueError, sqlite3.Error) as exc:
        report.findings.append(
            Finding("unrepairable", subject, f"could not be rebuilt: {type(exc).__name__}: {exc}")
        )
        return False
    if clients is None:
        report.findings.append(
            Finding(
                "unrepairable",
                subject,
                "no clients.json: its clients cannot be rebuilt (register them again: new tokens)",
            )
        )
    if lost:
        report.findings.append(
            Finding(
                "unrepairable",
                subject,
                f"{len(lost)} upload file(s) of clients it does not know, or damaged, stay on disk, "
                f"uncounted (e.g. {lost[0]})",
            )
        )
    report.note(
        subject,
        f"rebuilt: {spec.method}, {len(known)} client(s), rounds 1–{current} (round {current} open)",
    )
    return True


# -- checking a database against the disk --------------------------------------------------------------------


def _orphan_uploads(store: Store) -> list[Path]:
    """Upload files with no upload row (a crash between writing and committing; never read)."""
    rows = {store.rel(store.upload_path(*r)) for r in store.upload_keys()}
    return [
        p
        for p in store.root.glob("federations/*/rounds/*/uploads/*.safetensors")
        if store.rel(p) not in rows and not p.name.startswith(".")
    ]


def _check(store: Store, report: CheckReport) -> None:
    root = store.root
    feds = store.federation_specs()
    report.checked["federations"] = len(feds)

    # Every stored spec must read as the server reads it (a row it cannot read is set aside there).
    unreadable: set[str] = set()
    for fid, stored in feds.items():
        try:
            FederationSpec.model_validate_json(stored)
        except ValueError as exc:
            unreadable.add(fid)
            report.issue(
                f"federations/{fid}",
                f"its stored spec cannot be read ({unreadable_reason(exc)}); the server sets it aside",
                cannot="fix the row's spec, or delete the federation (ktl admin federation delete)",
            )

    # Federation folders without a row, rows without their spec.json / clients.json.
    reported = {f.subject for f in report.findings}
    for fid in _federation_folders(root):
        if fid in feds or f"federations/{fid}" in reported:
            continue
        has_spec = (store.federation_dir(fid) / "spec.json").is_file()
        report.issue(
            f"federations/{fid}",
            "a federation folder with no row in the database",
            repair=partial(_rebuild_one, store, fid, report) if has_spec else None,
            would="rebuilds the federation from its spec.json",
            cannot="it has no spec.json; its files stay on disk, unused",
        )
    for fid in feds:
        folder = store.federation_dir(fid)
        for name in ("spec.json", "clients.json"):
            if (folder / name).is_file():
                continue
            report.issue(
                f"federations/{fid}/{name}",
                "missing (the federation's copy for rebuilding a lost database)",
                repair=partial(_write_copies, store, fid),
                would="writes it from the database",
            )
            break  # both are written at once

    # What refers to stored files.
    referenced: dict[str, str] = {}
    uploads = store.upload_keys()
    report.checked["uploads"] = len(uploads)
    for u in uploads:
        referenced[store.rel(store.upload_path(u[0], u[1], u[2]))] = "upload"
    published = store.published_rounds()
    report.checked["published rounds"] = len(published)
    for fid, r in published:
        if fid not in feds or fid in unreadable:
            continue
        spec = FederationSpec.model_validate_json(feds[fid])
        folder = store.rel(store.round_dir(fid, r))
        for rec in store.file_records(folder + "/"):
            if not rec.path.startswith(folder + "/uploads/"):
                referenced[rec.path] = "published file"
        referenced[f"{folder}/{spec.method_class.broadcast_file}"] = "broadcast"
    jobs = store.finished_jobs()
    report.checked["finished jobs"] = len(jobs)
    for jid in jobs:
        referenced[store.rel(store.job_result_path(jid))] = "job result"
    snapshots = 0
    for fid in feds:
        for s in store.state_snapshots(fid):
            snapshots += 1
            prefix = store.rel(store.state_dir(fid, s)) + "/"
            for rec in store.file_records(prefix):
                referenced[rec.path] = "snapshot"
    report.checked["state snapshots"] = snapshots

    # Every recorded file against the disk.
    records = store.file_records()
    report.checked["files verified"] = len(records)
    for rec in records:
        problem = store.file_problem(rec.path)
        if problem is None:
            continue
        missing = not (root / rec.path).is_file()
        copy = rec.path.endswith(("/spec.json", "/clients.json")) and rec.path.count("/") == 2
        if copy:
            fid = rec.path.split("/")[1]
            if missing or fid not in feds:  # reported above (a missing copy, or a folder without a row)
                continue
            report.issue(
                rec.path,
                f"{describe_file(rec.path)}: {problem}",
                repair=partial(_write_copies, store, fid),
                would="writes it again from the database",
            )
            continue
        if missing and rec.path not in referenced:
            report.issue(
                rec.path,
                "a checksum row for a file that is gone and that nothing refers to",
                repair=partial(_forget, store, rec.path),
                would="deletes the row",
            )
            continue
        report.issue(
            rec.path,
            f"{describe_file(rec.path)}: {problem}",
            repair=None,
            cannot=_consequence(rec.path),
        )

    # Referenced files that have neither a row nor a file.
    recorded = {rec.path for rec in records}
    for rel, what in sorted(referenced.items()):
        if rel not in recorded and not (root / rel).is_file():
            report.issue(
                rel, f"{describe_file(rel)} ({what}) is missing", repair=None, cannot=_consequence(rel)
            )

    # Stored files without a row.
    orphans = {store.rel(p) for p in _orphan_uploads(store)}
    for rel in sorted(orphans):
        report.note(rel, "an upload file with no upload row (a crash before its commit): never read")
    reported = {f.subject for f in report.findings}
    for path in store.unrecorded_files():
        rel = store.rel(path)
        if rel in orphans or rel in reported:
            continue
        damage = _damage(path)
        report.issue(
            rel,
            f"{describe_file(rel)} has no checksum recorded" + (f" and {damage}" if damage else ""),
            repair=None if damage else partial(_record, store, path),
            would="records its checksum as it is now (trusting its present content)",
            cannot=_consequence(rel),
        )

    # Temporary files (harmless: removed at the next start; an upload in flight if the server runs).
    if not report.repair and (leftovers := _leftovers(root)):
        report.note("temporary files", f"{len(leftovers)} (removed when the server starts)")


def _write_copies(store: Store, fid: str) -> str:
    store.write_federation_copies(fid)
    return "spec.json and clients.json written from the database"


def _rebuild_one(store: Store, fid: str, report: CheckReport) -> str:
    return "rebuilt from its spec.json" if _rebuild_federation(store, fid, report) else "not rebuilt"


def _forget(store: Store, rel: str) -> str:
    store.forget_file(rel)
    return "deleted the row"


def _record(store: Store, path: Path) -> str:
    return "recorded its checksum as it is now" if store.record_unrecorded_files([path]) else "gone meanwhile"


def check_data_dir(data_dir: Path | str, *, repair: bool = False) -> CheckReport:
    """Check (and with ``repair`` fix what can be fixed in) a ``ktl serve`` data folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise KtlError(f"{root} is not a folder")
    report = CheckReport(root, repair)
    # A repair writes (and its store's start-up clears a crash's leftovers): never under a live server.
    lock = DataDirLock(root, "ktl admin check --repair").acquire() if repair else None
    try:
        store = _open(root, report)
        if store is None:
            return report
        try:
            _check(store, report)
        finally:
            store.close()
    finally:
        if lock is not None:
            lock.release()
    return report
