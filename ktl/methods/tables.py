"""The prototype-table family: FedProto, FedTGP and FedDistill (fd).

Each client uploads a per-class table (the `Prototypes` wire format), the server builds one global table,
and each client adds ``λ·‖x − g_y‖²`` on its own batches, where ``x`` is `TableMethod.client_vectors` of
the batch's head outputs. Every method shares the client model, the fixed ETF classifier, the margin loss
and the local budget; they differ only in what is exchanged.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ktl.clients import LocalClient, Regularizer
from ktl.clients.losses import etf_cosines
from ktl.errors import PayloadError
from ktl.methods.base import (
    ClientUpdate,
    CostShape,
    Method,
    MethodContext,
    MethodSettings,
    ServerCost,
    ServerUpdate,
    decode_prototypes,
    register_method,
)
from ktl.methods.privacy import PrivacySettings, privacy_facts, private_prototypes
from ktl.records import Prototypes
from ktl.work import Work, run_to_end

__all__ = [
    "BaselineSettings",
    "FedDistill",
    "FedProto",
    "FedTGP",
    "TableMethod",
    "TableMethodSettings",
    "TrainablePrototypes",
    "adaptive_margin",
    "class_mean_table",
]

# Mean ETF cosines lie in [−1, 1]; fp16 rounding moves them by < 1e-3.
_COSINE_TOLERANCE = 1e-2


class BaselineSettings(BaseModel):
    """Knobs of the baselines (fedproto, fedtgp, fd)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lam: float = Field(
        1.0,
        ge=0,
        le=1e6,
        description="Weight λ of the pull towards the global table: λ·‖x − g_y‖² summed over dims, mean "
        "over the batch, where x is the L2-normalised head output (fedproto, fedtgp) or the ETF cosines "
        "(fd). FedProto's 1.",
    )
    upload_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Dtype of uploaded tables, as FedKTL's, so bytes compare like for like."
    )
    tgp_steps: int = Field(
        100, ge=1, le=100_000, description="FedTGP: full-batch Adam steps per round (FedTGP: 100 epochs)."
    )
    tgp_lr: float = Field(0.01, gt=0, le=10, description="FedTGP: the server's learning rate.")
    tgp_hidden_dim: int = Field(
        128, ge=1, le=65_536, description="FedTGP: width of the trainable prototypes' MLP."
    )
    # Prototypes are unit vectors here, so distances are ≤ 2 and τ rarely binds.
    tgp_margin_threshold: float = Field(
        100.0,
        ge=0,
        le=1e6,
        description="FedTGP: cap τ of the adaptive margin min(max over classes of the nearest other class "
        "mean's distance, τ); FedTGP's 100.",
    )


class TableMethodSettings(MethodSettings):
    """The sections the table methods read."""

    baseline: BaselineSettings = Field(
        default_factory=BaselineSettings, description="The baselines' pull weight and FedTGP's server."
    )
    privacy: PrivacySettings = Field(
        default_factory=PrivacySettings, description="Differential privacy on uploaded prototypes."
    )


class FedDistillSettings(TableMethodSettings):
    """fd's sections: its upload is mean cosines, not prototypes, so the privacy mechanism does not apply."""

    @model_validator(mode="after")
    def _no_privacy(self) -> FedDistillSettings:
        if self.privacy.epsilon is not None:
            raise ValueError(
                "privacy.epsilon is not available for method 'fd' (its upload is not prototypes)"
            )
        return self


def class_mean_table(tables: Mapping[str, Prototypes], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-count-weighted mean per class over all uploads → ``(C, D)`` table and ``(C,)`` counts."""
    rows = list(tables.values())
    dim = int(rows[0].vectors.shape[1])
    sums = torch.zeros(num_classes, dim, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for t in rows:
        w = t.counts.double()
        sums.index_add_(0, t.class_ids, t.vectors.double() * w[:, None])
        counts.index_add_(0, t.class_ids, w)
    means = sums / counts.clamp_min(1)[:, None]
    return means.float(), counts


class TableMethod(Method):
    """Shared steps of FedProto, FedTGP and FedDistill (see the module)."""

    settings_model = TableMethodSettings
    broadcast_file = "table.safetensors"
    settings: TableMethodSettings

    def __init__(self, settings: MethodSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.upload_dtype: torch.dtype = getattr(torch, self.settings.baseline.upload_dtype)
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # client id → (C, D) table, (C,) mask

    def describe(self) -> dict[str, Any]:
        return privacy_facts(self.settings.privacy)

    # -- steps a subclass overrides --------------------------------------------------------------------

    def upload(self, client: LocalClient, round_index: int) -> Prototypes:
        """The client's per-class table (default: its prototypes, through DP when configured)."""
        return private_prototypes(self.settings.privacy, self.ctx.seed, client, round_index)

    def client_vectors(self, head_out: torch.Tensor, client: LocalClient) -> torch.Tensor:
        """What is pulled towards the global table (default: the L2-normalised head outputs)."""
        return F.normalize(head_out, dim=1)

    @abstractmethod
    def aggregate(
        self, tables: Mapping[str, Prototypes], round_index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The global ``(C, D)`` table and the ``(C,)`` sample counts behind each row (0 = absent)."""

    def aggregate_steps(
        self, tables: Mapping[str, Prototypes], round_index: int
    ) -> Work[tuple[torch.Tensor, torch.Tensor]]:
        """`aggregate` as resumable work (one slice unless a method trains on the server)."""
        return self.aggregate(tables, round_index)
        yield  # a generator: the slice ends here

    # -- the Method steps ----------------------------------------------------------------------------

    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        stats = client.train(regularizer=self._regularizer(client))
        return ClientUpdate(stats=stats, payload=self.upload(client, round_index).to_bytes(self.upload_dtype))

    def server_steps(self, uploads: Mapping[str, bytes], round_index: int) -> Work[ServerUpdate]:
        table, counts = yield from self.aggregate_steps(self.decode_uploads(uploads), round_index)
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

    def client_state(self, client: LocalClient) -> dict[str, torch.Tensor]:
        """The global table the client last received: ``table`` ``(C, D)`` float32 and ``mask`` ``(C,)``
        bool (classes the server sent); nothing before the first broadcast."""
        held = self.tables.get(client.client_id)
        if held is None:
            return {}
        table, mask = held
        return {"table": table.detach().cpu().clone(), "mask": mask.detach().cpu().clone()}

    def load_client_state(self, client: LocalClient, tensors: Mapping[str, torch.Tensor]) -> None:
        unknown = set(tensors) - {"table", "mask"}
        if unknown:
            raise ValueError(f"unknown {self.name} client state tensor(s) {sorted(unknown)}")
        if not tensors:
            self.tables.pop(client.client_id, None)
            return
        if set(tensors) != {"table", "mask"}:
            raise ValueError(f"{self.name} client state needs both table and mask")
        table, mask = tensors["table"], tensors["mask"]
        if table.shape[0] != client.num_classes or mask.shape != (client.num_classes,):
            raise ValueError(
                f"{self.name} client state is for {table.shape[0]} classes, the client has {client.num_classes}"
            )
        self.tables[client.client_id] = (
            table.to(client.device, torch.float32),
            mask.to(client.device, torch.bool),
        )

    def _regularizer(self, client: LocalClient) -> Regularizer | None:
        held = self.tables.get(client.client_id)
        lam = self.settings.baseline.lam
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

    def aggregate(
        self, tables: Mapping[str, Prototypes], round_index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return class_mean_table(tables, self.ctx.num_classes)


@register_method("fd")
class FedDistill(TableMethod):
    """FedDistill / FD (Jeong et al., 2018): per-class average "logits" (the ETF cosines) shared; clients
    pull each sample's cosines towards the global average of its class."""

    settings_model = FedDistillSettings

    def validate_upload(self, payload: bytes) -> Prototypes:
        """Per-class mean cosines: ``(n, C)`` rows in [−1, 1] (not unit vectors), distinct classes."""
        table = decode_prototypes(payload)
        table.validate(num_classes=self.ctx.num_classes, dim=self.ctx.num_classes, norm_tolerance=None)
        worst = float(table.vectors.float().abs().max())
        if worst > 1 + _COSINE_TOLERANCE:
            raise PayloadError("range", f"mean cosines must lie in [-1, 1]; the largest is {worst:.3g}")
        return table

    def upload(self, client: LocalClient, round_index: int) -> Prototypes:
        return client.mean_cosines()

    def client_vectors(self, head_out: torch.Tensor, client: LocalClient) -> torch.Tensor:
        return etf_cosines(head_out, client.etf)

    def aggregate(
        self, tables: Mapping[str, Prototypes], round_index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return class_mean_table(tables, self.ctx.num_classes)


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
    distance-based cross-entropy and an adaptive margin on the true class; kept across rounds (and across
    a server restart: the model and its Adam state are the method's saved state). Clients pull their
    normalised head outputs towards them, as in FedProto."""

    def __init__(self, settings: MethodSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        s = self.settings.baseline
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            self.model = TrainablePrototypes(ctx.num_classes, ctx.proto_dim, s.tgp_hidden_dim).to(ctx.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=s.tgp_lr)

    @classmethod
    def server_cost(cls, settings: MethodSettings, shape: CostShape) -> ServerCost:
        """The prototype model with gradients and Adam moments, and full-batch distances over every
        uploaded row, for ``tgp_steps`` steps."""
        if not isinstance(settings, TableMethodSettings):
            raise TypeError("FedTGP.server_cost takes TableMethodSettings")
        c, k, h = shape.num_classes, shape.proto_dim, settings.baseline.tgp_hidden_dim
        params = c * k + k * h + h + h * k + k
        rows = max(shape.rows, 1)
        floats = 4 * params + rows * (k + 3 * c) + c * (h + k) * 3
        flops = 6.0 * (k * h * 2) * c + 6.0 * rows * c * k
        return ServerCost(memory_bytes=4 * floats, steps=settings.baseline.tgp_steps, flops_per_step=flops)

    def aggregate(
        self, tables: Mapping[str, Prototypes], round_index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return run_to_end(self.aggregate_steps(tables, round_index))

    def aggregate_steps(
        self, tables: Mapping[str, Prototypes], round_index: int
    ) -> Work[tuple[torch.Tensor, torch.Tensor]]:
        """Train the global prototypes, yielding after every Adam step."""
        rows = list(tables.values())
        vectors = torch.cat([t.vectors.float() for t in rows])
        class_ids = torch.cat([t.class_ids for t in rows])
        counts = torch.zeros(self.ctx.num_classes, dtype=torch.float64)
        for t in rows:
            counts.index_add_(0, t.class_ids, t.counts.double())
        s = self.settings.baseline
        margin = adaptive_margin(vectors, class_ids, self.ctx.num_classes, s.tgp_margin_threshold)
        x, y = vectors.to(self.ctx.device), class_ids.to(self.ctx.device)
        one_hot = F.one_hot(y, self.ctx.num_classes).float()
        self.model.train()
        for _ in range(s.tgp_steps):
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
            yield
        with torch.no_grad():
            table = self.model().cpu()
        return table, counts

    # -- state: the trainable prototypes and their Adam moments ---------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for i, p in enumerate(self.model.parameters()):
            for key, value in self.optimizer.state.get(p, {}).items():
                out[f"adam.{i}.{key}"] = torch.as_tensor(value)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model)
        for i, p in enumerate(self.model.parameters()):
            state = {
                # Adam keeps its step count on the CPU unless it is fused or capturable
                key.split(".", 2)[2]: value if key.endswith(".step") else value.to(p.device)
                for key, value in tensors.items()
                if key.startswith(f"adam.{i}.")
            }
            if state:
                self.optimizer.state[p] = state
