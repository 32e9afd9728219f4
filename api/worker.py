"""The device worker: one thread that owns the accelerator and runs its work one piece at a time.

Round alignments come first; batch jobs run one generator batch per task and re-queue themselves, so a
round that closes while a long job runs waits at most one batch. HTTP handlers never touch the device:
uploads only parse, validate and write to the store, so GPU work never blocks them.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable

__all__ = ["DeviceWorker", "Task", "ROUND_PRIORITY", "JOB_PRIORITY"]

logger = logging.getLogger(__name__)

ROUND_PRIORITY = 0
JOB_PRIORITY = 1
_STOP_PRIORITY = -1

Task = Callable[[], "Task | None"]
"""A unit of device work; it may return a follow-up task, queued at the same priority."""


class DeviceWorker:
    def __init__(self, name: str = "ktl-device") -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Task | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._pending = 0  # queued + running tasks
        self._cond = threading.Condition()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def submit(self, priority: int, task: Task) -> None:
        with self._cond:
            self._pending += 1
        self._queue.put((priority, next(self._seq), task))

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the task in hand, then stop; queued work is left to the durable store's recovery."""
        self._queue.put((_STOP_PRIORITY, next(self._seq), None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the queue is empty and no task runs (for tests and benchmarks)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        while True:
            priority, _, task = self._queue.get()
            if task is None:
                return
            try:
                follow = task()
            except Exception:  # tasks record their own failures; this only keeps the worker alive
                logger.exception("device task failed")
                follow = None
            if follow is not None:
                self.submit(priority, follow)
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()
