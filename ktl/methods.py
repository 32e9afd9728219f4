"""Federated methods as registered classes with small steps.

A round in ``ktl simulate`` is: every client runs `Method.client_update` (local training, then what it
uploads, as bytes) → the server runs `Method.server_update` on the uploads (what it broadcasts) → every
client runs `Method.client_receive`. Payloads are the real wire bytes, so the bytes counted are the
bytes a deployment would move. New methods register with ``@register_method("name")``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ktl.clients import LocalClient, Regularizer, TrainStats
from ktl.clients.losses import etf_cosines
from ktl.clients.privacy import noise_std
from ktl.errors import ConfigError
from ktl.generator import load_generator
from ktl.imaging import pairs_grid_png
from ktl.records import Pairs, Prototypes
from ktl.round import KnowledgeTransferServer, RoundResult
from ktl.seeding import torch_generator

if TYPE_CHECKING:
    from ktl.config import SimulateConfig

__all__ = [
    "METHODS",
    "BaselineSettings",
    "ClientUpdate",
    "FedDistill",
    "FedKTL",
    "FedKTLLatents",
    "FedProto",
    "FedTGP",
    "LocalOnly",
    "PrivacySettings",
    "Method",
    "MethodContext",
    "ServerUpdate",
    "available_methods",
    "register_method",
]


class BaselineSettings(BaseModel):
    """Knobs of the baselines (fedproto, fedtgp, fd). Every method shares the client model, the fixed ETF
    classifier, the margin loss and the local budget; they differ only in what is exchanged."""

    model_config = ConfigDict(extra="forbid")

    # Weight λ of the pull towards the global table: λ·‖x − g_y‖² summed over dims, mean over the batch,
    # where x is the L2-normalised head output (fedproto, fedtgp) or the ETF cosines (fd). FedProto's 1.
    lam: float = Field(1.0, ge=0, le=1e6)
    upload_dtype: Literal["float16", "float32"] = "float16"  # as FedKTL's, so bytes compare like for like
    tgp_steps: int = Field(100, ge=1, le=100_000)  # full-batch Adam steps per round (FedTGP: 100 epochs)
    tgp_lr: float = Field(0.01, gt=0, le=10)  # FedTGP's server learning rate
    tgp_hidden_dim: int = Field(128, ge=1, le=65_536)  # the trainable prototypes' MLP width
    # FedTGP's adaptive margin is min(max over classes of the nearest other class mean's distance, τ); τ
    # = 100 is FedTGP's threshold. Prototypes are unit vectors here, so distances are ≤ 2 and τ rarely binds.
    tgp_margin_threshold: float = Field(100.0, ge=0)


class PrivacySettings(BaseModel):
    """Differential privacy on uploaded prototypes (fedktl, fedproto, fedtgp): the Gaussian mechanism on
    each round's per-class sums, with (ε, δ) for the whole run (see `ktl.clients.privacy`)."""

    model_config = ConfigDict(extra="forbid")

    epsilon: float | None = Field(None, gt=0)  # total ε over all rounds; None = no noise (no DP)
    delta: float = Field(1e-5, gt=0, lt=1)


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

    def save_round(self, run_dir: Path, round_index: int, uploads: Mapping[str, bytes]) -> None:
        """Write what a round produced that is worth inspecting later (default: nothing)."""
        return None

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
        prototypes = private_prototypes(self.ctx, client, round_index)
        return ClientUpdate(stats=stats, payload=prototypes.to_bytes(self.upload_dtype))

    def server_update(self, uploads: Mapping[str, bytes], round_index: int) -> ServerUpdate:
        prototypes = {cid: Prototypes.from_bytes(data) for cid, data in uploads.items()}
        result = self.server.run_round(prototypes, round_index=round_index)
        self.last = result
        return ServerUpdate(payload=result.pairs.to_bytes(), metrics=result.stats())

    def client_receive(self, client: LocalClient, payload: bytes) -> None:
        client.receive_pairs(Pairs.from_bytes(payload))

    def describe(self) -> dict[str, Any]:
        return {
            "generator": self.generator.description,
            "generator_pretrained": self.generator.pretrained,
            **privacy_facts(self.ctx),
        }

    def save_round(self, run_dir: Path, round_index: int, uploads: Mapping[str, bytes]) -> None:
        """Per round: the pairs (wire format) and the aligner's per-step loss/MMD/MSE under
        ``rounds/``; the last round's uploads as ``uploads.safetensors`` (for notebooks)."""
        if self.last is None:
            return
        folder = run_dir / "rounds"
        folder.mkdir(exist_ok=True)
        (folder / f"pairs-{round_index:04d}.safetensors").write_bytes(self.last.pairs.to_bytes())
        (folder / f"aligner-{round_index:04d}.json").write_text(json.dumps(self.last.history) + "\n")
        rows = [Prototypes.from_bytes(data) for data in uploads.values()]
        merged = Prototypes(
            vectors=torch.cat([p.vectors.float() for p in rows]),
            class_ids=torch.cat([p.class_ids for p in rows]),
            counts=torch.cat([p.counts for p in rows]),
        )
        (run_dir / "uploads.safetensors").write_bytes(merged.to_bytes())

    def save_artifacts(self, run_dir: Path) -> dict[str, str]:
        self.server.save_pretrained(run_dir / "aligner")
        out = {"aligner": "aligner"}
        if (run_dir / "rounds").is_dir():
            out.update(rounds="rounds", uploads="uploads.safetensors")
        if self.last is not None:
            pairs = self.last.pairs
            (run_dir / "pairs.safetensors").write_bytes(pairs.to_bytes())  # the wire format clients receive
            grid = pairs_grid_png(pairs, self.ctx.class_names, self.ctx.config.fedktl.pairs_per_class)
            (run_dir / "pairs.png").write_bytes(grid)
            out.update(pairs="pairs.safetensors", pairs_grid="pairs.png")
        return out


@register_method("fedktl-latents")
class FedKTLLatents(FedKTL):
    """Ablation "without the generator": the server aligns as FedKTL but sends only the class centroids
    (latents); each client distils its own images of a class towards that class's latent."""

    def server_update(self, uploads: Mapping[str, bytes], round_index: int) -> ServerUpdate:
        prototypes = {cid: Prototypes.from_bytes(data) for cid, data in uploads.items()}
        result = self.server.run_round(prototypes, round_index=round_index)
        self.last = result
        present = result.present.nonzero().flatten()
        table = Prototypes(
            vectors=result.centroids[present],
            class_ids=present,
            counts=torch.ones_like(present),
        )
        return ServerUpdate(payload=table.to_bytes(torch.float32), metrics=result.stats())

    def client_receive(self, client: LocalClient, payload: bytes) -> None:
        table = Prototypes.from_bytes(payload)
        client.receive_latent_targets(table.vectors, table.class_ids)


# -- privacy on uploaded prototypes ------------------------------------------------------------------


def private_prototypes(ctx: MethodContext, client: LocalClient, round_index: int) -> Prototypes:
    """The client's prototypes, through the Gaussian mechanism when ``privacy.epsilon`` is set."""
    privacy = ctx.config.privacy
    if privacy.epsilon is None:
        return client.prototypes()
    std = noise_std(privacy.epsilon, privacy.delta, ctx.config.rounds)
    g = torch_generator(ctx.config.seed, "privacy", client.client_id, round_index)
    return client.prototypes(noise_std=std, generator=g)


def privacy_facts(ctx: MethodContext) -> dict[str, Any]:
    privacy = ctx.config.privacy
    if privacy.epsilon is None:
        return {}
    std = noise_std(privacy.epsilon, privacy.delta, ctx.config.rounds)
    return {"privacy": {"epsilon": privacy.epsilon, "delta": privacy.delta, "noise_std": std}}


# -- baselines: a per-class table up, a global table down, a pull towards it -----------------------------


def class_mean_table(uploads: Mapping[str, bytes], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-count-weighted mean per class over all uploads → ``(C, D)`` table and ``(C,)`` counts."""
    tables = [Prototypes.from_bytes(data) for data in uploads.values()]
    dim = int(tables[0].vectors.shape[1])
    sums = torch.zeros(num_classes, dim, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for t in tables:
        w = t.counts.double()
        sums.index_add_(0, t.class_ids, t.vectors.double() * w[:, None])
        counts.index_add_(0, t.class_ids, w)
    means = sums / counts.clamp_min(1)[:, None]
    return means.float(), counts


class TableMethod(Method):
    """Shared steps of FedProto, FedTGP and FedDistill: each client uploads a per-class table (the
    `Prototypes` wire format), the server builds one global table, and each client adds
    ``λ·‖x − g_y‖²`` on its own batches, where ``x`` is `client_vectors` of the batch's head outputs."""

    supports_privacy: ClassVar[bool] = True

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.settings = ctx.config.baseline
        self.upload_dtype = getattr(torch, self.settings.upload_dtype)
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # client id → (C, D) table, (C,) mask
        if ctx.config.privacy.epsilon is not None and not self.supports_privacy:
            raise ConfigError(
                f"privacy.epsilon is not available for method {self.name!r} (its upload is not prototypes)"
            )

    def describe(self) -> dict[str, Any]:
        return privacy_facts(self.ctx)

    # -- steps a subclass overrides --------------------------------------------------------------------

    def upload(self, client: LocalClient, round_index: int) -> Prototypes:
        """The client's per-class table (default: its prototypes, through DP when configured)."""
        return private_prototypes(self.ctx, client, round_index)

    def client_vectors(self, head_out: torch.Tensor, client: LocalClient) -> torch.Tensor:
        """What is pulled towards the global table (default: the L2-normalised head outputs)."""
        return F.normalize(head_out, dim=1)

    @abstractmethod
    def aggregate(self, uploads: Mapping[str, bytes], round_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global ``(C, D)`` table and the ``(C,)`` sample counts behind each row (0 = absent)."""

    # -- the Method steps ----------------------------------------------------------------------------

    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        stats = client.train(regularizer=self._regularizer(client))
        return ClientUpdate(stats=stats, payload=self.upload(client, round_index).to_bytes(self.upload_dtype))

    def server_update(self, uploads: Mapping[str, bytes], round_index: int) -> ServerUpdate:
        table, counts = self.aggregate(uploads, round_index)
        present = (counts > 0).nonzero().flatten()
        payload = Prototypes(
            vectors=table[present], class_ids=present, counts=counts[present].round().long().clamp_min(1)
        ).to_bytes(self.upload_dtype)
        return ServerUpdate(payload=payload, metrics={"classes_in_table": float(present.numel())})

    def client_receive(self, client: LocalClient, payload: bytes) -> None:
        received = Prototypes.from_bytes(payload)
        table = torch.zeros(client.num_classes, received.vectors.shape[1])
        mask = torch.zeros(client.num_classes, dtype=torch.bool)
        table[received.class_ids] = received.vectors.float()
        mask[received.class_ids] = True
        self.tables[client.client_id] = (table.to(client.device), mask.to(client.device))

    def _regularizer(self, client: LocalClient) -> Regularizer | None:
        held = self.tables.get(client.client_id)
        lam = self.settings.lam
        if held is None or lam == 0:
            return None
        table, mask = held

        def pull(head_out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            keep = mask[labels].float()
            gap = (self.client_vectors(head_out, client) - table[labels]).pow(2).sum(dim=1)
            return lam * (gap * keep).sum() / keep.sum().clamp_min(1)

        return pull


@register_method("fedproto")
class FedProto(TableMethod):
    """FedProto (Tan et al., AAAI 2022): class prototypes averaged over clients (weighted by samples);
    clients pull their normalised head outputs towards the global prototype of each sample's class."""

    def aggregate(self, uploads: Mapping[str, bytes], round_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return class_mean_table(uploads, self.ctx.num_classes)


@register_method("fd")
class FedDistill(TableMethod):
    """FedDistill / FD (Jeong et al., 2018): per-class average "logits" (the ETF cosines) shared; clients
    pull each sample's cosines towards the global average of its class."""

    supports_privacy = False

    def upload(self, client: LocalClient, round_index: int) -> Prototypes:
        return client.mean_cosines()

    def client_vectors(self, head_out: torch.Tensor, client: LocalClient) -> torch.Tensor:
        return etf_cosines(head_out, client.etf)

    def aggregate(self, uploads: Mapping[str, bytes], round_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return class_mean_table(uploads, self.ctx.num_classes)


class TrainablePrototypes(nn.Module):
    """FedTGP's server model: a per-class embedding through a two-layer MLP gives the global prototypes."""

    def __init__(self, num_classes: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim))

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embedding.weight)


def adaptive_margin(
    vectors: torch.Tensor, class_ids: torch.Tensor, num_classes: int, threshold: float
) -> float:
    """FedTGP's margin: over the per-class means of the uploads, each class's distance to its nearest
    other class; the largest of those, capped at ``threshold`` (0 with fewer than two classes)."""
    present = class_ids.unique()
    if present.numel() < 2:
        return 0.0
    sums = torch.zeros(num_classes, vectors.shape[1]).index_add_(0, class_ids, vectors)
    counts = torch.bincount(class_ids, minlength=num_classes).float()
    means = sums[present] / counts[present, None]
    dist = torch.cdist(means, means)
    dist.fill_diagonal_(float("inf"))
    return float(min(dist.min(dim=1).values.max().item(), threshold))


@register_method("fedtgp")
class FedTGP(TableMethod):
    """FedTGP (Zhang et al., AAAI 2024): trainable global prototypes, trained on the server with a
    distance-based cross-entropy and an adaptive margin on the true class; kept across rounds. Clients pull
    their normalised head outputs towards them, as in FedProto."""

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        s = self.settings
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.config.seed)
            self.model = TrainablePrototypes(ctx.num_classes, ctx.proto_dim, s.tgp_hidden_dim).to(ctx.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=s.tgp_lr)

    def aggregate(self, uploads: Mapping[str, bytes], round_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tables = [Prototypes.from_bytes(data) for data in uploads.values()]
        vectors = torch.cat([t.vectors.float() for t in tables])
        class_ids = torch.cat([t.class_ids for t in tables])
        counts = torch.zeros(self.ctx.num_classes, dtype=torch.float64)
        for t in tables:
            counts.index_add_(0, t.class_ids, t.counts.double())
        margin = adaptive_margin(vectors, class_ids, self.ctx.num_classes, self.settings.tgp_margin_threshold)
        x, y = vectors.to(self.ctx.device), class_ids.to(self.ctx.device)
        one_hot = F.one_hot(y, self.ctx.num_classes).float()
        self.model.train()
        for _ in range(self.settings.tgp_steps):
            protos = self.model()
            # sqrt of a clamped squared distance: finite gradient where a row meets a prototype exactly
            dist = (
                (x.pow(2).sum(1, keepdim=True) - 2 * x @ protos.T + protos.pow(2).sum(1))
                .clamp_min(1e-12)
                .sqrt()
            )
            loss = F.cross_entropy(-(dist + margin * one_hot), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            table = self.model().cpu()
        return table, counts
