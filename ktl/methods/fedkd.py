"""``fedkd``: FedKD (Wu et al., Nature Communications 2022), as HtFLlib's ``serverkd``/``clientkd``.

Each client trains its own heterogeneous model (the mentor; trainable classifier, `ktl.methods.heads`) and
a small shared model (the mentee, ``fedkd.shared_model``) on the same batches, with adaptive mutual
distillation: with ``L = CE(own, y) + CE(shared, y)``,

    own:    CE(own, y)    + KL(shared ‖ own) / L + MSE(h_own, W_h·h_shared) / L
    shared: CE(shared, y) + KL(own ‖ shared) / L + MSE(h_own, W_h·h_shared) / L

where h are the head outputs (K dims) and ``W_h`` a client-private K × K map trained with them (the
hidden-state loss enters both, as in HtFLlib). Each KL learns from the other model's predictions held fixed;
``L`` is an adaptive weight (no gradient through it). The server averages the shared models, weighted by
samples, and sends the mean back. With ``fedkd.svd_energy`` T the mentee travels compressed both ways, as
in FedKD: each weight matrix (a conv kernel as out × in·k·k) as its top singular factors U·S and Vᵀ, as
many as keep the fraction T of the squared singular values, where that is smaller than the matrix
(FedKD raises T from T_start to T_end over the rounds; here it is one value). None: sent whole (float32).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ktl.clients import ClientModel, Companion, LocalClient
from ktl.errors import PayloadError
from ktl.methods.base import MethodSettings, register_method
from ktl.methods.fml import SharedBackbone
from ktl.methods.heads import SharedModelMethod, ensure_classifier, kl_to

__all__ = ["FedKD", "FedKDMethodSettings", "FedKDSettings", "svd_compress", "svd_recover"]

# the parts of a compressed tensor: ``<name>@u`` (m, k), ``<name>@v`` (k, n), ``<name>@shape`` (its dims)
_U, _V, _SHAPE = "@u", "@v", "@shape"
# a compressed tensor may stand for at most this many values (bounds the memory of decoding it)
_MAX_VALUES = 100_000_000


def svd_compress(tensors: Mapping[str, torch.Tensor], energy: float) -> dict[str, torch.Tensor]:
    """Each tensor of two or more dims as its top singular factors keeping ``energy`` of Σσ², where the
    factors are smaller than the tensor; the others as they are."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if t.dim() < 2:
            out[name] = t
            continue
        m = t.reshape(t.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        share = (s**2).cumsum(0) / (s**2).sum().clamp_min(1e-300)
        k = int((share < energy).sum()) + 1
        k = min(k, s.numel())
        if k * (m.shape[0] + m.shape[1]) >= m.numel():
            out[name] = t
            continue
        out[name + _U] = (u[:, :k] * s[:k]).float()
        out[name + _V] = vh[:k].float()
        out[name + _SHAPE] = torch.tensor(t.shape, dtype=torch.float32)
    return out


def svd_recover(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors `svd_compress` stood for (`PayloadError` for factors that do not fit together)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not name.endswith((_U, _V, _SHAPE)):
            out[name] = t
            continue
        if not name.endswith(_U):
            continue
        base = name.removesuffix(_U)
        v, shape_t = tensors.get(base + _V), tensors.get(base + _SHAPE)
        if v is None or shape_t is None or t.dim() != 2 or v.dim() != 2 or shape_t.dim() != 1:
            raise PayloadError("layout", f"compressed weight {base} needs 2-D @u and @v and a 1-D @shape")
        dims = [int(d) for d in shape_t.tolist()]
        if (
            not 2 <= len(dims) <= 8
            or any(d < 1 for d in dims)
            or [float(d) for d in dims] != shape_t.tolist()
            or math.prod(dims) > _MAX_VALUES
            or t.shape[1] != v.shape[0]
            or t.shape[0] != dims[0]
            or t.shape[0] * v.shape[1] != math.prod(dims)
        ):
            raise PayloadError("layout", f"compressed weight {base}'s factors do not make its shape")
        out[base] = (t.double() @ v.double()).float().reshape(dims)
    orphans = [n for n in tensors if n.endswith((_V, _SHAPE)) and n.rsplit("@", 1)[0] + _U not in tensors]
    if orphans:
        raise PayloadError("layout", f"compressed weight parts without their @u: {sorted(orphans)}")
    return out


class FedKDSettings(BaseModel):
    """FedKD's shared (mentee) model."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    shared_model: SharedBackbone = Field(
        "cnn4", description="Backbone of the mentee model every client trains and the server averages."
    )
    svd_energy: float | None = Field(
        None,
        gt=0,
        le=1,
        description="SVD compression of the exchanged mentee, both ways: each weight matrix as its top "
        "singular factors keeping this fraction of the squared singular values (FedKD's T, e.g. 0.95); "
        "none = sent whole.",
    )


class FedKDMethodSettings(MethodSettings):
    fedkd: FedKDSettings = Field(default_factory=FedKDSettings, description="FedKD: the shared mentee model.")


@register_method("fedkd")
class FedKD(SharedModelMethod):
    """FedKD: adaptive mutual distillation between each client's model and a shared, averaged mentee."""

    settings_model = FedKDMethodSettings
    broadcast_file = "shared_model.safetensors"
    settings: FedKDMethodSettings

    private_seed = "fedkd-w_h"

    @classmethod
    def shared_backbone_of(cls, settings: MethodSettings) -> str:
        if not isinstance(settings, FedKDMethodSettings):
            raise TypeError("FedKD.shared_backbone_of takes FedKDMethodSettings")
        return settings.fedkd.shared_model

    def encode(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        energy = self.settings.fedkd.svd_energy
        return tensors if energy is None else svd_compress(tensors, energy)

    def decode(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return svd_recover(tensors)

    def build_private(self) -> nn.Linear:
        """W_h, the client's K × K map from the mentee's head outputs to its own."""
        k = self.ctx.proto_dim
        return nn.Linear(k, k, bias=False)

    def companion(self, client: LocalClient, shared: ClientModel) -> Companion:
        classifier = ensure_classifier(client, self.ctx.seed)
        shared_classifier = shared.classifier
        assert shared_classifier is not None  # `shared_model` creates it
        w_h = self.private_module(client)
        assert w_h is not None  # `build_private` makes one

        def loss(x: torch.Tensor, head_out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            own = classifier(head_out)
            hidden = shared(x)
            other = shared_classifier(hidden)
            ce_other = F.cross_entropy(other, y)
            scale = (F.cross_entropy(own.detach(), y) + ce_other.detach()).clamp_min(1e-8)
            mse = F.mse_loss(head_out, w_h(hidden))
            return ce_other + (kl_to(own, other) + kl_to(other, own) + 2 * mse) / scale

        return Companion(loss=loss, parameters=[*shared.parameters(), *w_h.parameters()])
