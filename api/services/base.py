"""What every service of one server shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ktl.api.metrics import Metrics
from ktl.api.settings import ServerSettings
from ktl.api.store import Store
from ktl.api.worker import DevicePool, DeviceWorker
from ktl.generator import Generator

__all__ = ["ServerParts", "Service"]


@dataclass(frozen=True)
class ServerParts:
    """The store, the first device's worker (the rounds run there), that device, its generators (loaded at
    start-up, filled then), the metrics, the settings and the clock of one server; and every device's
    worker (``pool``, ``pool.workers[0] is worker``) with its own copy of every generator
    (``device_generators[i]`` on ``pool.workers[i].device``; ``device_generators[0] is generators``)."""

    store: Store
    worker: DeviceWorker
    device: torch.device
    generators: dict[str, Generator]
    metrics: Metrics
    settings: ServerSettings
    clock: Callable[[], float]
    pool: DevicePool
    device_generators: list[dict[str, Generator]]


class Service:
    """A service of one server: what it uses most of its `ServerParts`, by name."""

    def __init__(self, parts: ServerParts) -> None:
        self.parts = parts
        self.store = parts.store
        self.metrics = parts.metrics
        self.settings = parts.settings
        self.clock = parts.clock
