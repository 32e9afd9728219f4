"""A toy federated method, ``proto-median``, written once against the `Method` protocol (docs/extending.md).

Like FedProto, each client uploads its per-class prototypes and pulls its normalised head outputs towards
the server's global prototype of each sample's class. The twist is on the server: the global prototype
of a class is the coordinate-wise *median* of the clients' prototypes of that class (renormalised), not
their sample-weighted mean, so one client with odd (or poisoned) prototypes cannot drag it far.

It reads two settings sections: ``baseline`` (ktl's own; its ``lam`` is the pull weight) and ``median``,
its own (`MedianSettings`), which registering the method adds to every configuration: ``--median.min-clients
3`` on the command line, ``median.min-clients=3`` in Flower's run config, ``"median": {"min_clients": 3}``
in a federation spec over HTTP.

Use it as a local plugin file:

    ktl --plugin docs/examples/toy_method.py simulate --preset smoke --method proto-median

Every transport drives it unchanged: ``ktl simulate``, the HTTP server with ``ktl client run`` /
``ktl demo``, and Flower (where the client's state is `client_state`, saved between rounds).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ktl.clients import LocalClient, Regularizer
from ktl.methods import (
    BaselineSettings,
    ClientUpdate,
    Method,
    MethodContext,
    MethodSettings,
    ServerUpdate,
    register_method,
)
from ktl.records import Prototypes
from ktl.work import Work


class MedianSettings(BaseModel):
    """proto-median's own section: which classes the server's median table holds."""

    model_config = ConfigDict(extra="forbid")

    min_clients: int = Field(
        1,
        ge=1,
        le=100_000,
        description="A class enters the median table only when at least this many clients uploaded it "
        "that round (1: every uploaded class).",
    )


class ProtoMedianSettings(MethodSettings):
    """The configuration sections this method reads: ``baseline`` (ktl's; its ``lam``, the pull weight)
    and ``median``, its own — declared here, registered with the method."""

    baseline: BaselineSettings = Field(default_factory=BaselineSettings, description="λ of the pull.")
    median: MedianSettings = Field(default_factory=MedianSettings, description="The median table.")


@register_method("proto-median")
class ProtoMedian(Method):
    """FedProto with a coordinate-wise median on the server (see the module docstring)."""

    settings_model = ProtoMedianSettings
    settings: ProtoMedianSettings

    def __init__(self, settings: MethodSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # client id → (C, K) table, (C,) mask

    # -- client side: train with the pull, upload prototypes; take the broadcast -----------------------

    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        stats = client.train(regularizer=self._pull(client))
        return ClientUpdate(stats=stats, payload=client.prototypes().to_bytes(torch.float32))

    def client_receive(self, client: LocalClient, payload: bytes) -> None:
        received = Prototypes.from_bytes(payload)
        table = torch.zeros(client.num_classes, received.vectors.shape[1])
        mask = torch.zeros(client.num_classes, dtype=torch.bool)
        table[received.class_ids] = received.vectors.float()
        mask[received.class_ids] = True
        self.tables[client.client_id] = (table.to(client.device), mask.to(client.device))

    def client_state(self, client: LocalClient) -> dict[str, torch.Tensor]:
        held = self.tables.get(client.client_id)
        return {} if held is None else {"table": held[0].cpu(), "mask": held[1].cpu()}

    def load_client_state(self, client: LocalClient, tensors: Mapping[str, torch.Tensor]) -> None:
        if tensors:
            self.tables[client.client_id] = (
                tensors["table"].to(client.device),
                tensors["mask"].to(client.device),
            )

    def _pull(self, client: LocalClient) -> Regularizer | None:
        held = self.tables.get(client.client_id)
        if held is None:
            return None
        table, mask = held
        lam = self.settings.baseline.lam

        def pull(head_out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            keep = mask[labels].float()
            gap = (F.normalize(head_out, dim=1) - table[labels]).pow(2).sum(dim=1)
            return lam * (gap * keep).sum() / keep.sum().clamp_min(1)

        return pull

    # -- server side: validated uploads (the default check: unit-norm K-dim prototypes) → the median ---

    def server_steps(self, uploads: Mapping[str, bytes], round_index: int) -> Work[ServerUpdate]:
        tables = list(self.decode_uploads(uploads).values())
        rows, ids, counts = [], [], torch.zeros(self.ctx.num_classes, dtype=torch.long)
        for c in range(self.ctx.num_classes):
            vectors = [t.vectors[t.class_ids == c].float() for t in tables]
            held = torch.cat(vectors)
            if held.shape[0] == 0 or sum(v.shape[0] > 0 for v in vectors) < self.settings.median.min_clients:
                continue
            rows.append(F.normalize(held.median(dim=0).values, dim=0))
            ids.append(c)
            counts[c] = sum(int(t.counts[t.class_ids == c].sum()) for t in tables)
        class_ids = torch.tensor(ids, dtype=torch.long)
        vectors = torch.stack(rows) if rows else torch.zeros(0, self.ctx.proto_dim)  # no class qualified
        payload = Prototypes(vectors=vectors, class_ids=class_ids, counts=counts[class_ids])
        return ServerUpdate(
            payload=payload.to_bytes(torch.float32), metrics={"classes_in_table": float(len(ids))}
        )
        yield  # a generator (resumable work, `ktl.work`): this step is one slice
