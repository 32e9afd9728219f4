"""One writer per data folder: an exclusive ``flock`` on ``<data dir>/ktl.lock``.

A server (`ktl.api.service.KtlService`, before it opens the store: the store's start-up removes what a
crash left behind, which would be a live server's work in progress) and ``ktl admin check --repair`` hold
it while they run. A second one is refused with one line naming the holder (its pid and command, written
into the file). Read-only tools (``ktl admin check`` without ``--repair``, ``ktl generate --data-dir``)
take no lock and go on. The kernel drops the lock when the holder exits, however it exits (``kill -9``
included), so a stale file never blocks a restart.

Within one process, holders of the same folder share one lock (a count): tests run a server and its
restart in one process, and ``flock`` would refuse a second open file description of the same file.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ktl.errors import ConfigError

__all__ = ["LOCK_NAME", "DataDirLock", "holder_of"]

LOCK_NAME = "ktl.lock"


@dataclass
class _Held:
    file: IO[str]
    count: int


_held: dict[Path, _Held] = {}
_guard = threading.Lock()


def holder_of(root: Path) -> str:
    """Who wrote the lock file last (``pid 123: ktl serve``), or ``another process``."""
    try:
        text = (Path(root) / LOCK_NAME).read_text().strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "another process"


class DataDirLock:
    """The exclusive lock on a data folder, for ``what`` (e.g. ``ktl serve``); `acquire` raises
    `ConfigError` (one line) while another process holds it."""

    def __init__(self, root: Path | str, what: str) -> None:
        self.root = Path(root).resolve()
        self.what = what
        self._mine = False

    def acquire(self) -> DataDirLock:
        with _guard:
            held = _held.get(self.root)
            if held is not None:
                held.count += 1
                self._mine = True
                return self
            self.root.mkdir(parents=True, exist_ok=True)
            file = open(self.root / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 - held until release
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                file.close()
                raise ConfigError(
                    f"data folder {self.root} is in use by {holder_of(self.root)}; stop it first "
                    f"(one server per data folder; {self.what} refused)"
                ) from None
            file.seek(0)
            file.truncate()
            command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:3]))
            file.write(
                f"pid {os.getpid()}: {self.what} ({command}), since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            )
            file.flush()
            _held[self.root] = _Held(file, 1)
            self._mine = True
            return self

    def release(self) -> None:
        with _guard:
            if not self._mine:
                return
            self._mine = False
            held = _held[self.root]
            held.count -= 1
            if held.count == 0:
                del _held[self.root]
                fcntl.flock(held.file.fileno(), fcntl.LOCK_UN)
                held.file.close()

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
