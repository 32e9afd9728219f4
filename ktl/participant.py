"""A FedKTL client talking to a ktl server over HTTP: train → upload → wait → take the pairs.

Used by ``ktl client run`` (one participant per process) and ``ktl demo`` (all participants in one).
"""

from __future__ import annotations

import logging

import torch

from ktl.clients import LocalClient, TrainStats
from ktl.clients.sdk import KtlHttpClient

__all__ = ["train_and_upload", "take_pairs"]

logger = logging.getLogger(__name__)


def train_and_upload(
    client: LocalClient,
    sdk: KtlHttpClient,
    fid: str,
    r: int,
    *,
    mu: float,
    dtype: torch.dtype = torch.float16,
) -> tuple[TrainStats, dict[str, object]]:
    """One round of local training (with the pairs held from the last round), then the upload."""
    stats = client.train(mu=mu)
    answer = sdk.upload(fid, r, client.prototypes(), dtype=dtype)
    return stats, answer


def take_pairs(client: LocalClient, sdk: KtlHttpClient, fid: str, r: int, *, timeout: float = 600.0) -> bool:
    """Wait for round ``r`` and keep its pairs; False (pairs unchanged) if the round failed."""
    state = sdk.wait_for_round(fid, r, timeout=timeout)
    if state["state"] != "published":
        logger.warning("round %d of %s failed: %s; keeping the previous pairs", r, fid, state.get("error"))
        return False
    client.receive_pairs(sdk.pairs(fid, r))
    return True
