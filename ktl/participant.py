"""Clients of a ktl server: the federation's method, driven over HTTP through the SDK.

A round is the runner's (`ktl.runner`): `ktl.runner.client_step` (train, then the payload bytes, privacy
noise included) → upload → the server's rounds service runs the method's server step
(`ktl.runner.server_work`) → wait for the round → `Method.client_receive` on the broadcast bytes. Only
delivery differs from ``ktl simulate``. `HttpTransport` is the runner's transport for ``ktl demo`` (every
participant in one process, in lock-step); `participate` is one participant's side for ``ktl client
run``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ktl.clients import LocalClient, TrainStats
from ktl.clients.sdk import KtlHttpClient
from ktl.config import SimulateConfig
from ktl.data import FederatedData
from ktl.methods import Method, ServerUpdate, get_method
from ktl.runner import (
    Federation,
    HeldClients,
    RoundPlan,
    RoundReplies,
    Score,
    build_clients,
    client_step,
    method_context,
    method_settings,
)

__all__ = [
    "HttpTransport",
    "evaluation",
    "method_for_federation",
    "round_broadcast",
    "take_broadcast",
    "train_and_upload",
    "upload_metrics",
]

logger = logging.getLogger(__name__)


def method_for_federation(federation: dict[str, Any], *, seed: int, device: torch.device) -> Method:
    """The client side of a federation's method, with the federation's settings (its ``GET`` answer).

    ``seed`` seeds the client's own draws (its privacy noise): a deployed client should use a secret
    one — a server that knew it could subtract the noise.
    """
    spec = federation["spec"]
    cls = get_method(str(federation.get("method", spec.get("method", "fedktl"))))
    ctx = method_context(
        num_classes=int(spec["num_classes"]),
        proto_dim=int(federation["proto_dim"]),
        class_names=spec.get("class_names"),
        device=device,
        seed=seed,
    )
    return cls(cls.settings_from(spec), ctx)


def upload_metrics(score: Score, stats: TrainStats | None) -> dict[str, float] | None:
    """What a client reports with its upload (``Ktl-Metrics``): its accuracy on its own test split (the
    samples tested are the weight) and its mean supervised loss this round; None without test data."""
    correct, total = score
    if total == 0:
        return None
    report = {"n_samples": total, "accuracy": correct / total}
    if stats is not None and stats.steps > 0 and math.isfinite(stats.supervised_loss):
        report["train_loss"] = stats.supervised_loss
    return report


def evaluation(client: LocalClient, stats: TrainStats) -> dict[str, float] | None:
    """`upload_metrics` of ``client``'s evaluation after its training this round."""
    return upload_metrics(client.evaluate(), stats)


def train_and_upload(
    method: Method, client: LocalClient, sdk: KtlHttpClient, fid: str, r: int
) -> tuple[TrainStats | None, dict[str, Any] | None]:
    """One round of local training (the runner's client step, with what the last broadcast gave), then
    the upload with the client's own evaluation."""
    reply = client_step(method, client, 0, RoundPlan(r, None, [0], True))
    if reply.payload is None:
        return reply.stats, None
    answer = sdk.upload_bytes(fid, r, reply.payload, metrics=upload_metrics(client.evaluate(), reply.stats))
    return reply.stats, answer


def take_broadcast(
    method: Method, client: LocalClient, sdk: KtlHttpClient, fid: str, r: int, *, timeout: float = 600.0
) -> bool:
    """Wait for round ``r`` and take its broadcast; False (state unchanged) if the round failed."""
    broadcast = round_broadcast(sdk, fid, r, timeout=timeout)
    if broadcast is None:
        return False
    method.client_receive(client, broadcast)
    return True


def round_broadcast(sdk: KtlHttpClient, fid: str, r: int, *, timeout: float = 600.0) -> bytes | None:
    """Round ``r``'s broadcast once it is published; None (with a warning) if the round failed."""
    state = sdk.wait_for_round(fid, r, timeout=timeout)
    if state["state"] != "published":
        logger.warning("round %d of %s failed: %s; keeping what the client had", r, fid, state.get("error"))
        return None
    return sdk.broadcast(fid, r)


class HttpTransport(HeldClients):
    """The runner's transport through a ktl server: the clients live in this process, each with its own
    token; a round's uploads go over HTTP, the server's rounds service runs the method's server step and
    publishes; every client then downloads the broadcast. ``server_method`` (optional) gives the server's
    warm method after a round, when the server runs in this process (``ktl demo``): its round files and
    artefacts then go into the run folder as ``ktl simulate`` writes them."""

    name = "http"

    def __init__(
        self,
        url: str,
        admin_token: str,
        data: FederatedData,
        device: torch.device,
        *,
        spec: Mapping[str, Any],
        round_dir: Callable[[str, int], Path] | None = None,
        server_method: Callable[[str], Method | None] | None = None,
        timeout: float = 600.0,
    ) -> None:
        self.url = url
        self.admin_token = admin_token
        self.admin = KtlHttpClient(url, admin_token)
        self.data = data
        self.global_test = data.global_test
        self.device = device
        self.spec = dict(spec)
        self.round_dir = round_dir
        self.warm_method = server_method
        self.timeout = timeout
        self.fid = ""
        self.clients = []
        self.sdks: list[KtlHttpClient] = []
        self.moved = 0
        self.failed: list[str] = []  # rounds the server did not publish

    def open(self, config: SimulateConfig) -> Federation:
        fed = self.admin.create_federation(
            {
                **self.spec,
                "method": config.method,
                "num_classes": self.data.num_classes,
                "class_names": self.data.class_names,
                "seed": config.seed,
                "etf_seed": config.etf_seed,
                # The federation carries the method's settings sections, resolved as ktl simulate
                # resolves them (a privacy budget covers the run's rounds).
                **method_settings(config).model_dump(mode="json"),
            }
        )
        self.fid = fed["id"]
        generator = fed["generator"]["description"] if fed["generator"] else "none"
        logger.info("federation %s: %s, %d classes, generator: %s", self.fid, config.method,
                    self.data.num_classes, generator)  # fmt: skip
        self.clients = build_clients(config, self.data, self.admin.etf(self.fid), self.device)
        self.sdks = [
            KtlHttpClient(self.url, self.admin.register_client(self.fid, c.client_id)["token"])
            for c in self.clients
        ]
        self.config = config
        return Federation([c.client_id for c in self.clients], list(self.data.class_names), self.data.source)

    def train(self, plan: RoundPlan, broadcast: bytes | None) -> RoundReplies:
        replies = []
        for i in plan.chosen:
            reply = client_step(self.bound, self.clients[i], i, plan, self.config)
            if reply.payload is not None:  # with the client's own evaluation (Ktl-Metrics)
                reply.score = self.clients[i].evaluate()
                self.sdks[i].upload_bytes(
                    self.fid, plan.round, reply.payload, metrics=upload_metrics(reply.score, reply.stats)
                )
                self.moved += len(reply.payload)
            replies.append(reply)
        return RoundReplies(replies)

    def evaluate(self, plan: RoundPlan, replies: RoundReplies, broadcast: bytes | None) -> list[Score | None]:
        scored = {reply.index: reply.score for reply in replies.replies if reply.score is not None}
        return [scored.get(i) or client.evaluate() for i, client in enumerate(self.clients)]

    def server_update(
        self, method: Method, plan: RoundPlan, server_input: Mapping[str, bytes]
    ) -> ServerUpdate | None:
        """The server ran the step: wait for the round, then its broadcast, files and stats."""
        if not server_input:
            return None
        state = self.admin.wait_for_round(self.fid, plan.round, timeout=self.timeout)
        if state["state"] != "published":
            self.failed.append(f"round {plan.round}: {state.get('error') or state['state']}")
            logger.warning("round %d of %s failed: %s", plan.round, self.fid, state.get("error"))
            return None
        files: dict[str, bytes] = {}
        if self.round_dir is not None:  # the server's own folder (ktl demo runs the server)
            folder = self.round_dir(self.fid, plan.round)
            files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
            files.pop(method.broadcast_file, None)
        stats = {k: v for k, v in (state.get("stats") or {}).items() if k != "server_seconds"}
        return ServerUpdate(payload=self.admin.broadcast(self.fid, plan.round), metrics=stats, files=files)

    def server_method(self, method: Method) -> Method:
        warm = self.warm_method(self.fid) if self.warm_method is not None else None
        return warm if warm is not None else method

    def deliver(self, plan: RoundPlan, broadcast: bytes) -> int:
        for client, sdk in zip(self.clients, self.sdks, strict=True):  # each downloads it
            taken = sdk.broadcast(self.fid, plan.round)
            self.bound.client_receive(client, taken)
            self.moved += len(taken)
        return len(broadcast) * len(self.clients)

    def facts(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "federation": self.fid}

    def close(self) -> None:
        for sdk in [*self.sdks, self.admin]:
            sdk.close()
