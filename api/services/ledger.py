"""Which round's server step was executing when the server died: a crash is charged to that round only.

A round's attempts are counted durably when its step starts (`Store.start_attempt`): a step that kills
the process every time (a poison round) is given up after ``max_round_attempts``. Steps run in slices,
round-robin, so several rounds are under way at once; a crash during one of them must not be charged to
the others (with 30 clients and 5 random ``kill -9``s an honest round was given up after 4 attempts).

`StepLedger` keeps, in ``<data dir>/running-steps.json``, the steps under way and the one executing now
(written before each slice and after it: a small file replaced with ``os.replace``, no fsync — it must
survive the process, which the page cache does, not the machine). At start-up the rounds service reads
it: the step that was executing keeps its attempt, the others under way get theirs back. Where the file
is missing or unreadable (a machine crash), every attempt stays counted — the old, safe side.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LEDGER_NAME", "Ledger", "StepLedger"]

logger = logging.getLogger(__name__)

LEDGER_NAME = "running-steps.json"

Step = tuple[str, int]  # (federation id, round)


@dataclass(frozen=True)
class Ledger:
    """The previous life's steps under way, and the one executing when it ended (None: between slices)."""

    started: list[Step]
    executing: Step | None


class StepLedger:
    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LEDGER_NAME
        self._tmp = Path(root) / f".{LEDGER_NAME}.tmp"  # a leftover is removed at start-up with the others

    def write(self, started: dict[str, int], executing: Step | None) -> None:
        """Record the steps under way (federation → round) and the one executing now."""
        data = {"started": sorted(started.items()), "executing": list(executing) if executing else None}
        try:
            self._tmp.write_text(json.dumps(data))
            os.replace(self._tmp, self.path)
        except OSError as exc:  # a full disk: the attempts stay counted, as before the ledger
            logger.warning("cannot record the running server steps in %s: %s", self.path, exc)

    def read(self) -> Ledger | None:
        """What the previous life left, or None (no file, or one that cannot be read)."""
        try:
            data = json.loads(self.path.read_text())
            started = [(str(f), int(r)) for f, r in data["started"]]
            executing = data["executing"]
            return Ledger(started, (str(executing[0]), int(executing[1])) if executing else None)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
