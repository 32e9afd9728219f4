"""Writing to disk: atomic writes (temporary file, fsync, rename, folder fsync), SHA-256 of a file,
what a full disk looks like and how it is reported (507 with Retry-After at the HTTP edge)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import sqlite3
from pathlib import Path

from ktl.errors import InsufficientStorageError

logger = logging.getLogger(__name__)


RETRY_AFTER_S = 30


STORAGE_PREFIX = "insufficient_storage:"  # how a round that failed for lack of space says so in its error


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
