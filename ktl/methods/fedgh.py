"""``fedgh``: FedGH (Yi et al., ACM MM 2023) — a generalized global header trained on the server.

Each client trains its heterogeneous model with a trainable linear classifier ``K → C`` (cross-entropy,
`ktl.methods.heads`) and uploads its per-class prototypes: the plain mean of its head outputs over its
training samples of each class (the classifier's inputs, not normalised). The server trains one global
classifier on the uploaded prototypes — each (prototype, class) pair a training sample, cross-entropy, SGD
on shuffled mini-batches for ``fedgh.server_epochs`` epochs — keeps it across rounds, and sends it back;
every client replaces its classifier with it (HtFLlib's ``servergh``/``clientgh``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ktl.clients import LocalClient
from ktl.clients.model import seeded_linear
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
from ktl.methods.heads import classifier_draws, classifier_tensors, ensure_classifier, load_classifier
from ktl.records import WEIGHT_LIMIT, Prototypes, Weights
from ktl.seeding import derive_seed
from ktl.work import Work

__all__ = ["FedGH", "FedGHMethodSettings", "FedGHSettings"]


class FedGHSettings(BaseModel):
    """The server's training of the global classifier (HtFLlib's defaults)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    server_lr: float = Field(0.01, gt=0, le=10, description="SGD learning rate of the server's classifier.")
    server_epochs: int = Field(
        100, ge=1, le=10_000, description="Epochs over the round's uploaded prototypes per round."
    )
    server_batch_size: int = Field(
        10, ge=1, le=100_000, description="Prototypes per server SGD step (HtFLlib: the client batch size)."
    )


class FedGHMethodSettings(MethodSettings):
    fedgh: FedGHSettings = Field(
        default_factory=FedGHSettings, description="FedGH: the server's training of the global classifier."
    )


@register_method("fedgh")
class FedGH(Method):
    """FedGH: prototypes up, a server-trained global classifier down."""

    settings_model = FedGHMethodSettings
    broadcast_file = "classifier.safetensors"
    settings: FedGHMethodSettings

    def __init__(self, settings: MethodSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        # The server's classifier starts as every client's does (HtFLlib: client 0's initial head).
        self.head = seeded_linear(ctx.proto_dim, ctx.num_classes, classifier_draws(ctx.seed)).to(ctx.device)

    # -- client side ---------------------------------------------------------------------------------

    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        ensure_classifier(client, self.ctx.seed)
        stats = client.train()
        return ClientUpdate(stats=stats, payload=client.mean_features().to_bytes(torch.float32))

    def client_receive(self, client: LocalClient, payload: bytes) -> None:
        weights = Weights.from_bytes(payload)
        load_classifier(ensure_classifier(client, self.ctx.seed), weights.tensors)

    # -- server side ---------------------------------------------------------------------------------

    def validate_upload(self, payload: bytes) -> Prototypes:
        """Per-class mean features: ``(n, K)`` finite rows within ±`WEIGHT_LIMIT` (not unit vectors),
        distinct classes, positive counts."""
        table = decode_prototypes(payload)
        table.validate(num_classes=self.ctx.num_classes, dim=self.ctx.proto_dim, norm_tolerance=None)
        worst = float(table.vectors.float().abs().max())
        if worst > WEIGHT_LIMIT:
            raise PayloadError("range", f"mean features reach {worst:.3g}, beyond ±{WEIGHT_LIMIT:g}")
        return table

    @classmethod
    def server_cost(cls, settings: MethodSettings, shape: CostShape) -> ServerCost:
        """The classifier with its gradient, and one mini-batch of rows, for epochs × batches steps."""
        if not isinstance(settings, FedGHMethodSettings):
            raise TypeError("FedGH.server_cost takes FedGHMethodSettings")
        s = settings.fedgh
        c, k, rows = shape.num_classes, shape.proto_dim, max(shape.rows, 1)
        batches = -(-rows // s.server_batch_size)
        floats = 3 * (c * k + c) + rows * (k + 2) + s.server_batch_size * c * 3
        return ServerCost(
            memory_bytes=4 * floats,
            steps=s.server_epochs * batches,
            flops_per_step=6.0 * min(rows, s.server_batch_size) * c * k,
        )

    def server_steps(self, uploads: Mapping[str, bytes], round_index: int) -> Work[ServerUpdate]:
        """Train the global classifier on every uploaded (prototype, class) pair, yielding after each
        epoch; broadcast it."""
        tables = list(self.decode_uploads(uploads).values())
        x = torch.cat([t.vectors.float() for t in tables]).to(self.ctx.device)
        y = torch.cat([t.class_ids for t in tables]).to(self.ctx.device)
        s = self.settings.fedgh
        order_rng = torch.Generator().manual_seed(derive_seed(self.ctx.seed, "fedgh-order", round_index))
        optimizer = torch.optim.SGD(self.head.parameters(), lr=s.server_lr)
        self.head.train()
        loss = torch.zeros(())
        for _ in range(s.server_epochs):
            order = torch.randperm(x.shape[0], generator=order_rng).to(self.ctx.device)
            for batch in order.split(s.server_batch_size):
                loss = F.cross_entropy(self.head(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            yield
        weights = Weights(classifier_tensors(self.head), torch.tensor([x.shape[0]], dtype=torch.int64))
        return ServerUpdate(
            payload=weights.to_bytes(torch.float32),
            metrics={"server_loss": float(loss.detach()), "prototypes": float(x.shape[0])},
        )

    # -- state: the global classifier ----------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"head.{k}": v for k, v in classifier_tensors(self.head).items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        load_classifier(self.head, {k.removeprefix("head."): v for k, v in tensors.items()})
