"""Client side of FedKTL (``ktl.clients``): backbone zoo, ETF, margin loss, local trainer."""

from ktl.clients.backbones import available_backbones, build_backbone, register_backbone
from ktl.clients.etf import simplex_etf
from ktl.clients.losses import distillation_loss, margin_logits, margin_loss
from ktl.clients.model import ClientModel
from ktl.clients.trainer import (
    ClientSettings,
    Companion,
    LocalClient,
    LocalData,
    Regularizer,
    TrainStats,
)

__all__ = [
    "ClientModel",
    "ClientSettings",
    "Companion",
    "LocalClient",
    "LocalData",
    "Regularizer",
    "TrainStats",
    "available_backbones",
    "build_backbone",
    "distillation_loss",
    "margin_logits",
    "margin_loss",
    "register_backbone",
    "simplex_etf",
]
