"""The device workers: one thread per device, each owning its accelerator and running one piece at a time.

A `DevicePool` holds one `DeviceWorker` per device (``--devices``). A task is either pinned to one worker
(`DeviceWorker.submit`: rounds, always on the first device, whose state lives there) or shared
(`DevicePool.submit_any`: a batch job's generator batches, taken by whichever worker is free first).
A worker always runs the most urgent task it may take (lowest priority, then first submitted), pinned or
shared, so round alignments come first on the first device; batch jobs run one generator batch per task
and re-queue themselves, so a round that closes while a long job runs waits at most one batch. HTTP
handlers never touch a device: uploads only parse, validate and write to the store, so GPU work never
blocks them.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["DevicePool", "DeviceWorker", "Task", "AnyTask", "ROUND_PRIORITY", "JOB_PRIORITY"]

logger = logging.getLogger(__name__)

ROUND_PRIORITY = 0
JOB_PRIORITY = 1

Task = Callable[[], "Task | None"]
"""A unit of work pinned to one worker; it may return a follow-up task, queued there at the same priority."""

AnyTask = Callable[["DeviceWorker"], "AnyTask | None"]
"""A unit of work any worker may run, called with that worker (its ``index`` and ``device``); it may return
a follow-up, queued for any worker at the same priority."""


class _Hub:
    """What the workers of one pool share: a lock and condition, the shared queue, the pending count."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seq = itertools.count()
        self.shared: list[tuple[int, int, AnyTask]] = []  # a heap: (priority, seq, task)
        self.pending = 0  # queued + running tasks of every worker

    def push(self, heap: list[Any], priority: int, task: Any) -> None:
        """Queue ``task`` on ``heap`` (a worker's own or the shared one); the caller holds ``cond``."""
        self.pending += 1
        heapq.heappush(heap, (priority, next(self.seq), task))


class DeviceWorker:
    """One thread that owns ``device``; on its own (as before) or one of a `DevicePool`'s."""

    def __init__(
        self,
        name: str = "ktl-device",
        *,
        device: torch.device | None = None,
        index: int = 0,
        hub: _Hub | None = None,
    ) -> None:
        self.device = device if device is not None else torch.device("cpu")
        self.index = index
        self.tasks_run = 0  # tasks this worker ran (pinned and shared), for tests and benchmarks
        self._hub = hub if hub is not None else _Hub()
        self._local: list[tuple[int, int, Task]] = []  # a heap, guarded by the hub's condition
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def submit(self, priority: int, task: Task) -> None:
        """Queue ``task`` on this worker only."""
        with self._hub.cond:
            self._hub.push(self._local, priority, task)
            self._hub.cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the task in hand, then stop; queued work is left to the durable store's recovery."""
        self._signal_stop()
        self.join(timeout)

    def _signal_stop(self) -> None:
        with self._hub.cond:
            self._stopping = True
            self._hub.cond.notify_all()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running on this worker nor on any worker of its pool (for
        tests and benchmarks)."""
        with self._hub.cond:
            return self._hub.cond.wait_for(lambda: self._hub.pending == 0, timeout)

    def _next(self) -> tuple[int, Task | None, AnyTask | None] | None:
        """The most urgent task this worker may run (None once stopping), waiting for one."""
        hub = self._hub
        with hub.cond:
            while not self._stopping:
                local = self._local[0][:2] if self._local else None
                shared = hub.shared[0][:2] if hub.shared else None
                if shared is not None and (local is None or shared < local):
                    priority, _, any_task = heapq.heappop(hub.shared)
                    return priority, None, any_task
                if local is not None:
                    priority, _, task = heapq.heappop(self._local)
                    return priority, task, None
                hub.cond.wait()
            return None

    def _run(self) -> None:
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # this thread's default CUDA device (its streams, "cuda")
        while (item := self._next()) is not None:
            priority, task, any_task = item
            follow: Task | None = None
            follow_any: AnyTask | None = None
            try:
                if task is not None:
                    follow = task()
                elif any_task is not None:
                    follow_any = any_task(self)
            except Exception:  # tasks record their own failures; this only keeps the worker alive
                logger.exception("device task failed on %s", self.device)
            hub = self._hub
            with hub.cond:
                self.tasks_run += 1
                if follow is not None:
                    hub.push(self._local, priority, follow)
                if follow_any is not None:
                    hub.push(hub.shared, priority, follow_any)
                hub.pending -= 1
                hub.cond.notify_all()


class DevicePool:
    """One `DeviceWorker` per device; ``workers[0]`` is the first device's (the rounds' worker)."""

    def __init__(self, devices: Sequence[torch.device]) -> None:
        if not devices:
            raise ValueError("a device pool needs at least one device")
        self._hub = _Hub()
        self.workers = [
            DeviceWorker(f"ktl-device-{i}", device=device, index=i, hub=self._hub)
            for i, device in enumerate(devices)
        ]

    @property
    def devices(self) -> list[torch.device]:
        return [w.device for w in self.workers]

    def __len__(self) -> int:
        return len(self.workers)

    @property
    def alive(self) -> bool:
        return all(w.alive for w in self.workers)

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def submit_any(self, priority: int, task: AnyTask) -> None:
        """Queue ``task`` for whichever worker is free first."""
        with self._hub.cond:
            self._hub.push(self._hub.shared, priority, task)
            self._hub.cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Every worker finishes the task in hand, then stops (all asked at once, then joined)."""
        for w in self.workers:
            w._signal_stop()
        for w in self.workers:
            w.join(timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self.workers[0].wait_idle(timeout)
