"""A client of a ktl server: the federation's method, driven over HTTP through the SDK.

Each round: `Method.client_update` (train, then the payload bytes, privacy noise included) → upload →
wait for the round → `Method.client_receive` on the broadcast bytes. The steps are the method's, exactly
as ``ktl simulate`` drives them; only delivery differs. Used by ``ktl client run`` (one participant per
process) and ``ktl demo`` (all participants in one).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ktl.clients import LocalClient, TrainStats
from ktl.clients.sdk import KtlHttpClient
from ktl.methods import Method, MethodContext, get_method

__all__ = ["evaluation", "method_for_federation", "take_broadcast", "train_and_upload"]

logger = logging.getLogger(__name__)


def method_for_federation(federation: dict[str, Any], *, seed: int, device: torch.device) -> Method:
    """The client side of a federation's method, with the federation's settings (its ``GET`` answer).

    ``seed`` seeds the client's own draws (its privacy noise): a deployed client should use a secret
    one — a server that knew it could subtract the noise.
    """
    spec = federation["spec"]
    cls = get_method(str(federation.get("method", spec.get("method", "fedktl"))))
    ctx = MethodContext(
        num_classes=int(spec["num_classes"]),
        proto_dim=int(federation["proto_dim"]),
        class_names=spec.get("class_names"),
        device=device,
        seed=seed,
    )
    return cls(cls.settings_from(spec), ctx)


def evaluation(client: LocalClient, stats: TrainStats) -> dict[str, float] | None:
    """What a client reports with its upload (``Ktl-Metrics``): its accuracy on its own test split (the
    samples tested are the weight) and its mean supervised loss this round; None without test data."""
    correct, total = client.evaluate()
    if total == 0:
        return None
    report = {"n_samples": total, "accuracy": correct / total}
    if stats.steps > 0 and math.isfinite(stats.supervised_loss):
        report["train_loss"] = stats.supervised_loss
    return report


def train_and_upload(
    method: Method, client: LocalClient, sdk: KtlHttpClient, fid: str, r: int
) -> tuple[TrainStats, dict[str, Any] | None]:
    """One round of local training (with what the last broadcast gave), then the upload with the
    client's evaluation after that training (`evaluation`)."""
    client.start_round(r)  # the round's learning rate (client.lr_schedule)
    update = method.client_update(client, r)
    answer = None
    if update.payload is not None:
        answer = sdk.upload_bytes(fid, r, update.payload, metrics=evaluation(client, update.stats))
    return update.stats, answer


def take_broadcast(
    method: Method, client: LocalClient, sdk: KtlHttpClient, fid: str, r: int, *, timeout: float = 600.0
) -> bool:
    """Wait for round ``r`` and take its broadcast; False (state unchanged) if the round failed."""
    state = sdk.wait_for_round(fid, r, timeout=timeout)
    if state["state"] != "published":
        logger.warning("round %d of %s failed: %s; keeping what the client had", r, fid, state.get("error"))
        return False
    method.client_receive(client, sdk.broadcast(fid, r))
    return True
