"""``fml``: Federated Mutual Learning (Shen et al., 2020), as HtFLlib's ``serverfml``/``clientfml``.

Each client trains its own heterogeneous model (trainable classifier, `ktl.methods.heads`) and a small
shared model (the "meme" model, ``fml.shared_model``) on the same batches by deep mutual learning:

    own:    α·CE(own, y) + (1 − α)·KL(shared ‖ own)
    shared: β·CE(shared, y) + (1 − β)·KL(own ‖ shared)

each model learning from the other's predictions held fixed (as in the paper; HtFLlib lets the KL terms
reach both models). The server averages the shared models, weighted by samples, and sends the mean back.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ktl.clients import ClientModel, Companion, LocalClient
from ktl.clients.backbones import BACKBONES
from ktl.methods.base import MethodSettings, register_method
from ktl.methods.heads import SharedModelMethod, ensure_classifier, kl_to

__all__ = ["FML", "FMLMethodSettings", "FMLSettings", "SharedBackbone", "known_backbone"]


def known_backbone(name: str) -> str:
    if name not in BACKBONES:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(BACKBONES))}")
    return name


# a shared model's backbone setting (FML, FedKD, FedMRL): a registered backbone's name
SharedBackbone = Annotated[str, AfterValidator(known_backbone)]


class FMLSettings(BaseModel):
    """FML's shared model and the weights of mutual learning (the paper's α = β = 0.5)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    shared_model: SharedBackbone = Field(
        "cnn4", description="Backbone of the shared model every client trains and the server averages."
    )
    alpha: float = Field(0.5, ge=0, le=1, description="α: the own model's CE weight (1 − α: its KL).")
    beta: float = Field(0.5, ge=0, le=1, description="β: the shared model's CE weight (1 − β: its KL).")


class FMLMethodSettings(MethodSettings):
    fml: FMLSettings = Field(
        default_factory=FMLSettings, description="FML: the shared model and mutual-learning weights."
    )


@register_method("fml")
class FML(SharedModelMethod):
    """FML: mutual learning between each client's model and a shared, averaged one."""

    settings_model = FMLMethodSettings
    broadcast_file = "shared_model.safetensors"
    settings: FMLMethodSettings

    @classmethod
    def shared_backbone_of(cls, settings: MethodSettings) -> str:
        if not isinstance(settings, FMLMethodSettings):
            raise TypeError("FML.shared_backbone_of takes FMLMethodSettings")
        return settings.fml.shared_model

    def supervised_weight(self) -> float:
        return self.settings.fml.alpha

    def companion(self, client: LocalClient, shared: ClientModel) -> Companion:
        s = self.settings.fml
        classifier = ensure_classifier(client, self.ctx.seed)
        shared_classifier = shared.classifier
        assert shared_classifier is not None  # `shared_model` creates it

        def loss(x: torch.Tensor, head_out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            own = classifier(head_out)
            other = shared_classifier(shared(x))
            return (
                (1 - s.alpha) * kl_to(own, other)
                + s.beta * F.cross_entropy(other, y)
                + (1 - s.beta) * kl_to(other, own)
            )

        return Companion(loss=loss, parameters=list(shared.parameters()))
