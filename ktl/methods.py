"""Federated methods as registered classes with small steps.

A round in ``ktl simulate`` is: every client runs `Method.client_update` (local training, then what it
uploads, as bytes) → the server runs `Method.server_update` on the uploads (what it broadcasts) → every
client runs `Method.client_receive`. Payloads are the real wire bytes, so the bytes counted are the
bytes a deployment would move. New methods register with ``@register_method("name")``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ktl.clients import LocalClient, TrainStats
from ktl.generator import load_generator
from ktl.imaging import pairs_grid_png
from ktl.records import Pairs, Prototypes
from ktl.round import KnowledgeTransferServer, RoundResult

if TYPE_CHECKING:
    from ktl.config import SimulateConfig

__all__ = [
    "METHODS",
    "ClientUpdate",
    "FedKTL",
    "LocalOnly",
    "Method",
    "MethodContext",
    "ServerUpdate",
    "available_methods",
    "register_method",
]


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about the run."""

    config: SimulateConfig
    num_classes: int
    proto_dim: int
    class_names: list[str]
    device: torch.device


@dataclass(frozen=True)
class ClientUpdate:
    stats: TrainStats
    payload: bytes | None  # what the client uploads this round (None: nothing)


@dataclass(frozen=True)
class ServerUpdate:
    payload: bytes | None  # what every client downloads (None: nothing)
    metrics: dict[str, float] = field(default_factory=dict)


class Method(ABC):
    """One federated method; subclasses override the steps they need."""

    name: ClassVar[str]

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        """Train locally and return what to upload."""

    def server_update(self, uploads: Mapping[str, bytes], round_index: int) -> ServerUpdate:
        """Turn the round's uploads into a broadcast."""
        return ServerUpdate(payload=None)

    def client_receive(self, client: LocalClient, payload: bytes) -> None:
        """Take the server's broadcast into the client's state (default: ignore it)."""
        return None

    def describe(self) -> dict[str, Any]:
        """Facts for ``summary.json`` (e.g. which generator ran)."""
        return {}

    def save_artifacts(self, run_dir: Path) -> dict[str, str]:
        """Write the method's final state into the run folder; returns name → relative path."""
        return {}


METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def wrap(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    return sorted(METHODS)


@register_method("local")
class LocalOnly(Method):
    """Training alone: the same models, data and local budget, nothing exchanged."""

    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        return ClientUpdate(stats=client.train(), payload=None)


@register_method("fedktl")
class FedKTL(Method):
    """FedKTL: prototypes up, image-vector pairs from the aligned generator down, distillation on them."""

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        self.generator = load_generator(cfg.generator, ctx.device)
        self.server = KnowledgeTransferServer.create(
            num_classes=ctx.num_classes,
            proto_dim=ctx.proto_dim,
            generator=self.generator,
            aligner_settings=cfg.aligner,
            pairs_per_class=cfg.fedktl.pairs_per_class,
            device=ctx.device,
            seed=cfg.seed,
        )
        self.upload_dtype = getattr(torch, cfg.fedktl.upload_dtype)
        self.last: RoundResult | None = None

    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        stats = client.train(mu=self.ctx.config.fedktl.mu)
        return ClientUpdate(stats=stats, payload=client.prototypes().to_bytes(self.upload_dtype))

    def server_update(self, uploads: Mapping[str, bytes], round_index: int) -> ServerUpdate:
        prototypes = {cid: Prototypes.from_bytes(data) for cid, data in uploads.items()}
        result = self.server.run_round(prototypes, round_index=round_index)
        self.last = result
        return ServerUpdate(payload=result.pairs.to_bytes(), metrics=result.stats())

    def client_receive(self, client: LocalClient, payload: bytes) -> None:
        client.receive_pairs(Pairs.from_bytes(payload))

    def describe(self) -> dict[str, Any]:
        return {"generator": self.generator.description, "generator_pretrained": self.generator.pretrained}

    def save_artifacts(self, run_dir: Path) -> dict[str, str]:
        self.server.save_pretrained(run_dir / "aligner")
        out = {"aligner": "aligner"}
        if self.last is not None:
            pairs = self.last.pairs
            (run_dir / "pairs.safetensors").write_bytes(pairs.to_bytes())  # the wire format clients receive
            grid = pairs_grid_png(pairs, self.ctx.class_names, self.ctx.config.fedktl.pairs_per_class)
            (run_dir / "pairs.png").write_bytes(grid)
            out.update(pairs="pairs.safetensors", pairs_grid="pairs.png")
        return out
