"""Secure-aggregation variants of FedProto and FedKTL: the server learns per-class sums, never one client's
prototypes.

Each client uploads a *summand* (`Method.aggregation` ``"sum"``): dense, fixed-shape tensors

- ``weighted`` ``(C, K)``: ``n_c / S · p_c`` for every class ``c`` (its prototype times its sample count; a
  zero row for a class it does not hold),
- ``counts`` ``(C,)``: ``n_c / S``,
- ``clients`` ``(1,)``: 1 (the sum counts the clients behind it),

where ``S = secagg.count_scale`` is a public bound on one client's samples per class, so every value lies in
[−1, 1], the range Flower's SecAgg+ quantizes. A transport hands the server step only the element-wise sum
of the round's summands (`Method.server_input`): on Flower under SecAgg+ (`ktl.flower`: pairwise and
private masks, so the server can recover neither a single summand nor which classes a client holds), in
``ktl simulate`` in plaintext (one process: there is nobody to hide from; the numbers are the same up to
SecAgg+'s quantisation). From the sum the server recovers, per class, the count-weighted mean of the
clients' prototypes and the total count — FedProto's global table exactly; FedKTL then aligns on these C
means instead of every client's prototypes.

The HTTP server cannot host these methods (it would see each upload); it refuses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ktl.clients import LocalClient
from ktl.errors import ConfigError, PayloadError
from ktl.methods.base import ClientUpdate, Method, register_method, sum_summands
from ktl.methods.fedktl import FedKTL, FedKTLMethodSettings
from ktl.methods.privacy import PrivacySettings, private_prototypes
from ktl.methods.tables import FedProto, TableMethodSettings
from ktl.records import Prototypes

__all__ = [
    "FedKTLSecAgg",
    "FedProtoSecAgg",
    "SecureSum",
    "SecureSumSettings",
    "decode_sum",
    "encode_summand",
]

# A class counts as present when its summed count is at least half a sample: SecAgg+'s quantisation error
# is ~1e-6 of S per client, far below it.
_PRESENT = 0.5
# Slack for the quantisation error when checking a sum: |weighted row| ≤ count and counts ≥ 0.
_SLACK = 1e-3


class SecureSumSettings(BaseModel):
    """Secure aggregation of prototypes (the ``*-secagg`` methods)."""

    model_config = ConfigDict(extra="forbid")

    count_scale: int = Field(
        65_536,
        ge=1,
        le=1 << 24,
        description="Public bound S on one client's training samples per class: summands are scaled by 1/S "
        "into [-1, 1], SecAgg+'s range; SecAgg+'s quantisation step is about 5e-7 of S per client. A client "
        "with more samples of a class refuses to upload.",
    )


def encode_summand(prototypes: Prototypes, num_classes: int, dim: int, scale: int) -> bytes:
    """A client's prototypes → its summand (see the module)."""
    counts = prototypes.counts.double()
    if bool((counts > scale).any()):
        worst = int(counts.max())
        raise ConfigError(f"a client holds {worst} samples of one class, above secagg.count_scale {scale}")
    weighted = torch.zeros(num_classes, dim, dtype=torch.float64)
    share = torch.zeros(num_classes, dtype=torch.float64)
    weighted[prototypes.class_ids] = prototypes.vectors.double() * (counts / scale)[:, None]
    share[prototypes.class_ids] = counts / scale
    clients = torch.ones(1, dtype=torch.float64)
    # float64: a power-of-two S scales exactly, so the plaintext sum equals FedProto's mean bit for bit.
    return st_save({"weighted": weighted, "counts": share, "clients": clients})


def decode_sum(payload: bytes, num_classes: int, dim: int, scale: int) -> tuple[Prototypes, int]:
    """A sum of summands → the per-class count-weighted means of the present classes (rows not
    renormalised) with their total counts, and the number of clients summed; `PayloadError` for a sum no
    set of valid summands can make."""
    tensors = {k: v.double() for k, v in st_load(payload).items()}
    weighted, counts = tensors["weighted"] * scale, tensors["counts"] * scale
    clients = float(tensors["clients"].item())
    if round(clients) < 1 or abs(clients - round(clients)) > 0.25:
        raise PayloadError("sum", f"the sum stands for {clients:.3f} clients, not a positive whole number")
    if bool((counts < -_SLACK * scale).any()) or bool((counts > clients * scale * (1 + _SLACK)).any()):
        raise PayloadError("sum", "summed class counts out of range")
    if bool((weighted.norm(dim=1) > counts.clamp_min(0) * (1 + _SLACK) + _SLACK * scale).any()):
        raise PayloadError("sum", "a summed prototype is longer than its count allows")
    present = (counts >= _PRESENT).nonzero().flatten()
    if present.numel() == 0:
        raise PayloadError("no_uploads", "the sum holds no class")
    means = weighted[present] / counts[present, None]
    table = Prototypes(
        vectors=means.float(), class_ids=present, counts=counts[present].round().long().clamp_min(1)
    )
    return table, round(clients)


class SecureSum(Method):
    """The client and server steps shared by the ``*-secagg`` methods (mixed in before the plain method)."""

    aggregation = "sum"
    renormalise: ClassVar[bool] = False  # FedKTL aligns unit vectors; FedProto's table keeps the plain means

    def _shape(self) -> tuple[int, int, int]:
        secagg: SecureSumSettings = getattr(self.settings, "secagg")  # noqa: B009 - both settings models carry it
        return self.ctx.num_classes, self.ctx.proto_dim, secagg.count_scale

    def summand_layout(self) -> dict[str, tuple[int, ...]]:
        c, k, _ = self._shape()
        return {"weighted": (c, k), "counts": (c,), "clients": (1,)}

    def summand(self, client: LocalClient, round_index: int) -> bytes:
        c, k, scale = self._shape()
        privacy: PrivacySettings = getattr(self.settings, "privacy")  # noqa: B009
        prototypes = private_prototypes(privacy, self.ctx.seed, client, round_index)
        return encode_summand(prototypes, c, k, scale)

    def validate_upload(self, payload: bytes) -> Prototypes:
        """One summand, checked as a sum of one (a transport that sees single uploads refuses these
        methods; this serves tests and ``ktl simulate``'s checks)."""
        return self.decode_uploads({"one": payload})["sum"]

    def decode_uploads(self, uploads: Mapping[str, bytes]) -> dict[str, Prototypes]:
        """Whatever is given — the one sum, or summands — summed, then decoded into one table of per-class
        means: the server step's only input."""
        c, k, scale = self._shape()
        table, _ = decode_sum(sum_summands(uploads.values(), self.summand_layout()), c, k, scale)
        if self.renormalise:
            table = Prototypes(
                vectors=F.normalize(table.vectors, dim=1), class_ids=table.class_ids, counts=table.counts
            )
        return {"sum": table}


class SecureProtoSettings(TableMethodSettings):
    secagg: SecureSumSettings = Field(
        default_factory=SecureSumSettings, description="Secure aggregation of the uploaded prototypes."
    )


class SecureFedKTLSettings(FedKTLMethodSettings):
    secagg: SecureSumSettings = Field(
        default_factory=SecureSumSettings, description="Secure aggregation of the uploaded prototypes."
    )


@register_method("fedproto-secagg")
class FedProtoSecAgg(SecureSum, FedProto):
    """FedProto whose server sees only the per-class sums (under SecAgg+ on Flower); its broadcast equals
    FedProto's up to the quantisation of SecAgg+."""

    settings_model = SecureProtoSettings

    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        stats = client.train(regularizer=self._regularizer(client))
        return ClientUpdate(stats=stats, payload=self.summand(client, round_index))


@register_method("fedktl-secagg")
class FedKTLSecAgg(SecureSum, FedKTL):
    """FedKTL whose server sees only the per-class sums: F is aligned on the C per-class means (renormalised)
    instead of every client's prototypes."""

    settings_model = SecureFedKTLSettings
    renormalise = True

    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        stats = client.train(mu=self.settings.fedktl.mu)
        return ClientUpdate(stats=stats, payload=self.summand(client, round_index))
