"""``fedmrl``: FedMRL (Yi et al., NeurIPS 2024, "Federated Model Heterogeneous Matryoshka Representation
Learning"), as HtFLlib's ``servermrl``/``clientmrl``.

Beside its own heterogeneous model (extractor: backbone → head to K; local header: a trainable classifier,
`ktl.methods.heads`), each client trains a small shared *homogeneous* model (``fedmrl.shared_model``):
an extractor to d dims (backbone → head to d, ``fedmrl.sub_dim``) and the global header (a d → C
classifier). A sample goes through both extractors; a client-private projector (a linear map d + K → K)
fuses the two representations, ``r = P([G(x), F(x)])``, and the fused representation is read as Matryoshka
representations: its first d dims (coarse) by the global header, all K (fine) by the local one. The loss
is the sum of the two cross-entropies,

    CE(local_header(r), y) + CE(global_header(r[:, :d]), y),

and it trains everything on the path. The server averages the shared models (extractor and global header),
weighted by samples, and sends the mean back; the projector and the client's own model stay private.
A client predicts with its local header on the fused representation (what the paper evaluates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ktl.clients import ClientModel, Companion, LocalClient
from ktl.errors import ConfigError
from ktl.methods.base import ClientUpdate, MethodSettings, register_method
from ktl.methods.fml import SharedBackbone
from ktl.methods.heads import SharedModelMethod, ensure_classifier

__all__ = ["FedMRL", "FedMRLMethodSettings", "FedMRLSettings"]


class FedMRLSettings(BaseModel):
    """FedMRL's shared homogeneous model and the size of its (coarse) representation."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    shared_model: SharedBackbone = Field(
        "cnn4", description="Backbone of the shared homogeneous extractor every client trains and the server "
        "averages (with the global header).",
    )  # fmt: skip
    sub_dim: int | None = Field(
        None,
        ge=1,
        description="d: the shared extractor's output and the global header's input, the first d of the K "
        "fused dims (at most K); none = ⌈K/4⌉, HtFLlib's ratio (128 of 512).",
    )


class FedMRLMethodSettings(MethodSettings):
    fedmrl: FedMRLSettings = Field(
        default_factory=FedMRLSettings,
        description="FedMRL: the shared homogeneous model and its representation size.",
    )


@register_method("fedmrl")
class FedMRL(SharedModelMethod):
    """FedMRL: each client fuses its own and a shared extractor's representations through a private
    projector; the fused representation's prefix trains the shared (averaged) header, all of it the local
    one."""

    settings_model = FedMRLMethodSettings
    broadcast_file = "shared_model.safetensors"
    private_seed = "fedmrl-projector"
    settings: FedMRLMethodSettings

    @classmethod
    def check_shape(cls, settings: MethodSettings, num_classes: int, proto_dim: int) -> None:
        d = cls.shared_dim_of(settings, proto_dim)
        if d > proto_dim:
            raise ConfigError(f"fedmrl.sub_dim {d} exceeds the representation's K = {proto_dim}")

    @classmethod
    def shared_backbone_of(cls, settings: MethodSettings) -> str:
        if not isinstance(settings, FedMRLMethodSettings):
            raise TypeError("FedMRL.shared_backbone_of takes FedMRLMethodSettings")
        return settings.fedmrl.shared_model

    @classmethod
    def shared_dim_of(cls, settings: MethodSettings, proto_dim: int) -> int:
        """d: ``fedmrl.sub_dim``, else ⌈K/4⌉."""
        if not isinstance(settings, FedMRLMethodSettings):
            raise TypeError("FedMRL.shared_dim_of takes FedMRLMethodSettings")
        return settings.fedmrl.sub_dim or math.ceil(proto_dim / 4)

    def build_private(self) -> nn.Linear:
        """The representation projector, d + K → K (HtFLlib's ``proj``)."""
        k = self.ctx.proto_dim
        return nn.Linear(self.shared_dim_of(self.settings, k) + k, k)

    def attach(self, client: LocalClient) -> None:
        """Make the client's model predict through the fused representation: its classifier (the local
        header) then reads ``P([G(x), F(x)])``; the shared extractor follows the model's train/eval mode."""
        ensure_classifier(client, self.ctx.seed)
        shared, projector = self.shared_model(client), self.private_module(client)
        assert projector is not None  # `build_private` makes one
        model = client.model

        def fuse(x: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
            shared.train(model.training)
            return projector(torch.cat((shared(x), rep), dim=1))

        model.fusion = fuse

    def companion(self, client: LocalClient, shared: ClientModel) -> Companion:
        """The global header's CE on the fused representation's first d dims (the local header's CE is the
        client's supervised loss, its classifier reading the fused representation)."""
        d = self.shared_dim_of(self.settings, self.ctx.proto_dim)
        global_header, projector = shared.classifier, self.private_module(client)
        assert global_header is not None and projector is not None  # `shared_model`, `build_private`

        def loss(x: torch.Tensor, fused: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(global_header(fused[:, :d]), y)

        return Companion(loss=loss, parameters=[*shared.parameters(), *projector.parameters()])

    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        self.attach(client)
        return super().client_update(client, round_index)

    def client_receive(self, client: LocalClient, payload: bytes) -> None:
        super().client_receive(client, payload)
        self.attach(client)

    def load_client_state(self, client: LocalClient, tensors: Mapping[str, torch.Tensor]) -> None:
        super().load_client_state(client, tensors)
        if client.client_id in self.shared:
            self.attach(client)
        else:
            client.model.fusion = None
