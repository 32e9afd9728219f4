"""``local``: training alone — the same models, data and local budget as every method, nothing exchanged."""

from __future__ import annotations

from ktl.clients import LocalClient
from ktl.methods.base import ClientUpdate, Method, register_method

__all__ = ["LocalOnly"]


@register_method("local")
class LocalOnly(Method):
    """Training alone: the lower bound every federated method must beat."""

    exchanges = False

    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        return ClientUpdate(stats=client.train(), payload=None)
