"""One server instance: the store, the device workers, the generators and the services per resource.

`KtlService` owns the life cycle (load generators on every device, recover unfinished work, run the
deadline scheduler, stop) and composes the services the routes call: `federations` (federations,
clients, tokens), `rounds` (uploads, the round lifecycle, the method's server step) and `jobs` (batch
generation). All state lives in `Store`; nothing here knows HTTP. One `DeviceWorker` per device: rounds
on the first, batch jobs' batches on all of them.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

from ktl.api.admission import DeviceBudget
from ktl.api.lock import DataDirLock
from ktl.api.metrics import Metrics
from ktl.api.services import FederationService, JobService, RoundService, ServerParts
from ktl.api.settings import ServerSettings, resolve_devices
from ktl.api.store import Store
from ktl.api.worker import DevicePool
from ktl.errors import ConfigError
from ktl.generator import Generator, load_generator

__all__ = ["KtlService"]

logger = logging.getLogger(__name__)


class KtlService:
    """Call `start` before use and `stop` at the end (the app's lifespan does)."""

    def __init__(self, settings: ServerSettings, *, clock: Callable[[], float] = time.time) -> None:
        if settings.admin_token is None or not settings.admin_token.get_secret_value():
            raise ConfigError("no admin token: set KTL_ADMIN_TOKEN (the server refuses to start without one)")
        self.settings = settings
        self.clock = clock
        # One worker per device; rounds run on the first (``worker``, ``device``, ``generators``), batch
        # jobs' batches on every one (``device_generators[i]`` is device i's copy of every generator).
        self.devices = resolve_devices(settings)
        self.device = self.devices[0]
        # Before the store opens: its start-up clears what a crash left, which would be a live server's.
        self.lock = DataDirLock(settings.data_dir, "ktl serve").acquire()
        try:
            self.store = Store(settings.data_dir, min_free_bytes=settings.min_free_bytes)
        except BaseException:
            self.lock.release()
            raise
        self.metrics = Metrics()
        self.pool = DevicePool(self.devices)
        self.worker = self.pool.workers[0]
        self.device_generators: list[dict[str, Generator]] = [{} for _ in self.devices]
        self.generators = self.device_generators[0]
        parts = ServerParts(
            self.store,
            self.worker,
            self.device,
            self.generators,
            self.metrics,
            settings,
            clock,
            self.pool,
            self.device_generators,
        )
        self.federations = FederationService(parts)
        self.rounds = RoundService(parts, self.federations)
        self.jobs = JobService(parts, self.federations, self.rounds)
        self._stop = threading.Event()
        self._scheduler = threading.Thread(target=self._schedule, name="ktl-scheduler", daemon=True)
        self.ready = False

    def start(self) -> None:
        """Load every generator once per device, recover unfinished work, start the workers and the
        scheduler."""
        logger.info(
            "%d device worker(s): %s (rounds on %s; batch jobs on all)",
            len(self.devices),
            ", ".join(str(d) for d in self.devices),
            self.device,
        )
        for name, spec in self.settings.generators.items():
            for generators, device in zip(self.device_generators, self.devices, strict=True):
                generators[name] = load_generator(spec, device)
            logger.info("generator %r: %s", name, self.generators[name].description)
        self.federations.budget = DeviceBudget.measure(
            self.device,
            memory_bytes=self.settings.max_federation_bytes,
            seconds=self.settings.max_align_seconds,
        )
        logger.info(
            "device %s: %.1f GFLOP/s, %.2f ms per small step; a federation may use %.2f GiB and %g s per round",
            self.device,
            self.federations.budget.flops_per_s / 1e9,
            self.federations.budget.step_overhead_s * 1e3,
            self.federations.budget.memory_bytes / 2**30,
            self.federations.budget.seconds,
        )
        self.pool.start()
        self.rounds.recover()
        self.jobs.recover()
        self._scheduler.start()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        self._stop.set()
        if self._scheduler.is_alive():
            self._scheduler.join(5)
        self.pool.stop()
        if not self.worker.alive:  # between two slices: nothing runs any more
            self.rounds.release_running()
        self.store.close()
        self.lock.release()

    @property
    def alive(self) -> bool:
        """Ready to serve, and every device worker is running."""
        return self.ready and self.pool.alive

    def is_admin(self, token: str | None) -> bool:
        expected = self.settings.admin_token.get_secret_value() if self.settings.admin_token else ""
        return token is not None and secrets.compare_digest(token.encode(), expected.encode())

    def _schedule(self) -> None:
        while not self._stop.wait(self.settings.scheduler_interval_s):
            try:
                self.rounds.close_due()
                self.rounds.retry_storage_failures()
                self.rounds.reconcile()
                self.jobs.reconcile()
                self.jobs.expire()
            except Exception:
                logger.exception("round scheduler failed")
