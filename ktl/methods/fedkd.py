"""``fedkd``: FedKD (Wu et al., Nature Communications 2022), as HtFLlib's ``serverkd``/``clientkd``.

Each client trains its own heterogeneous model (the mentor; trainable classifier, `ktl.methods.heads`) and
a small shared model (the mentee, ``fedkd.shared_model``) on the same batches, with adaptive mutual
distillation: with ``L = CE(own, y) + CE(shared, y)``,

    own:    CE(own, y)    + KL(shared ‖ own) / L + MSE(h_own, W_h·h_shared) / L
    shared: CE(shared, y) + KL(own ‖ shared) / L + MSE(h_own, W_h·h_shared) / L

where h are the head outputs (K dims) and ``W_h`` a client-private K × K map trained with them (the
hidden-state loss enters both, as in HtFLlib). Each KL learns from the other model's predictions held fixed;
``L`` is an adaptive weight (no gradient through it). The server averages the shared models, weighted by
samples, and sends the mean back. FedKD's SVD compression of the exchanged update is not applied here: the
shared model travels whole (float32).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ktl.clients import ClientModel, Companion, LocalClient
from ktl.methods.base import MethodContext, MethodSettings, register_method
from ktl.methods.fml import known_backbone
from ktl.methods.heads import SharedModelMethod, ensure_classifier, kl_to
from ktl.seeding import derive_seed

__all__ = ["FedKD", "FedKDMethodSettings", "FedKDSettings"]

_W_H = "w_h.weight"


class FedKDSettings(BaseModel):
    """FedKD's shared (mentee) model."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    shared_model: str = Field(
        "cnn4", description="Backbone of the mentee model every client trains and the server averages."
    )

    @field_validator("shared_model")
    @classmethod
    def _known(cls, name: str) -> str:
        return known_backbone(name)


class FedKDMethodSettings(MethodSettings):
    fedkd: FedKDSettings = Field(default_factory=FedKDSettings, description="FedKD: the shared mentee model.")


@register_method("fedkd")
class FedKD(SharedModelMethod):
    """FedKD: adaptive mutual distillation between each client's model and a shared, averaged mentee."""

    settings_model = FedKDMethodSettings
    broadcast_file = "shared_model.safetensors"
    settings: FedKDMethodSettings

    def __init__(self, settings: MethodSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.maps: dict[str, nn.Linear] = {}  # client id → its W_h

    @classmethod
    def shared_backbone_of(cls, settings: MethodSettings) -> str:
        if not isinstance(settings, FedKDMethodSettings):
            raise TypeError("FedKD.shared_backbone_of takes FedKDMethodSettings")
        return settings.fedkd.shared_model

    def hidden_map(self, client: LocalClient) -> nn.Linear:
        held = self.maps.get(client.client_id)
        if held is None:
            k = self.ctx.proto_dim
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.ctx.seed, "fedkd-w_h", client.client_id))
                held = nn.Linear(k, k, bias=False).to(client.device)
            self.maps[client.client_id] = held
        return held

    def companion(self, client: LocalClient, shared: ClientModel) -> Companion:
        classifier = ensure_classifier(client, self.ctx.seed)
        shared_classifier = shared.classifier
        assert shared_classifier is not None  # `shared_model` creates it
        w_h = self.hidden_map(client)

        def loss(x: torch.Tensor, head_out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            own = classifier(head_out)
            hidden = shared(x)
            other = shared_classifier(hidden)
            ce_other = F.cross_entropy(other, y)
            scale = (F.cross_entropy(own.detach(), y) + ce_other.detach()).clamp_min(1e-8)
            mse = F.mse_loss(head_out, w_h(hidden))
            return ce_other + (kl_to(own, other) + kl_to(other, own) + 2 * mse) / scale

        return Companion(loss=loss, parameters=[*shared.parameters(), *w_h.parameters()])

    def client_state(self, client: LocalClient) -> dict[str, torch.Tensor]:
        out = super().client_state(client)
        held = self.maps.get(client.client_id)
        if held is not None:
            out[_W_H] = held.weight.detach().cpu().clone()
        return out

    def load_client_state(self, client: LocalClient, tensors: Mapping[str, torch.Tensor]) -> None:
        own = {k: v for k, v in tensors.items() if k != _W_H}
        super().load_client_state(client, own)
        if _W_H in tensors:
            with torch.no_grad():
                self.hidden_map(client).weight.copy_(tensors[_W_H])
        else:
            self.maps.pop(client.client_id, None)
