"""One federation runner for every transport.

A federation's round is written once, here: who takes part (``study``: join ratio, dropout, stragglers),
the method's context (`method_context`, the one builder every transport uses), the client step
(`client_step`), every reply validated by the method at the runner's edge (a malformed reply is that
client's failure, the round goes on), the server step, the evaluation policy, early stop, the metrics
line of each round, the run folder (``config.json``, ``metrics.jsonl``, ``summary.json``, the method's
round files and artefacts, client weights where the runner holds the clients; docs/run-folder.md).

The runner reaches its clients through a small `Transport` (the anchor: Flower's ``Strategy.start`` over
its ``Grid``): it is opened (the clients and the classes), asked to train a round's participants, to
evaluate every client, to deliver the broadcast; the server step runs here, or — over HTTP — on the
server, which runs the method's own server step. Implementations: `LocalTransport` (``ktl simulate``, in
process), ``ktl.flower.server_app.GridTransport`` (Flower's Simulation and Deployment Engines) and
``ktl.demo.HttpTransport`` (a ktl server; ``ktl demo``). A transport has no round loop of its own.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from ktl.clients import ClientModel, LocalClient, TrainStats, simplex_etf
from ktl.clients.trainer import scheduled_lr
from ktl.config import SimulateConfig
from ktl.data import FederatedData, GlobalTest, build_federated_data
from ktl.device import resolve_device
from ktl.errors import ConfigError, PayloadError
from ktl.generator import Generator, load_generator
from ktl.host import host_facts, versions
from ktl.methods import (
    SUM_UPLOAD,
    Method,
    MethodContext,
    MethodSettings,
    PrivacySettings,
    ServerUpdate,
    get_method,
)
from ktl.seeding import derive_seed
from ktl.study import (
    CLIENT_WEIGHTS,
    Plateau,
    is_evaluated,
    is_globally_evaluated,
    load_client_weights,
    miss_reason,
    participants,
    save_client_weights,
)
from ktl.work import Work

__all__ = [
    "Federation",
    "HeldClients",
    "LocalTransport",
    "Reply",
    "RoundPlan",
    "RoundReplies",
    "Runner",
    "Score",
    "Transport",
    "build_client",
    "build_clients",
    "build_method",
    "client_step",
    "evaluate_clients",
    "method_context",
    "method_settings",
    "participate",
    "prepare_run_dir",
    "published_files",
    "server_work",
    "weighted_accuracy",
]

logger = logging.getLogger(__name__)

Score = tuple[int, int]
"""A client's evaluation: (correct, total) test samples."""


# -- building blocks every transport uses ---------------------------------------------------------------


def method_context(
    *,
    num_classes: int,
    class_names: Sequence[str] | None,
    device: torch.device,
    seed: int,
    proto_dim: int | None = None,
    generator: Generator | None = None,
) -> MethodContext:
    """What a method may know about the federation — the one builder (simulate, Flower's apps, a
    participant, the HTTP server). K defaults to C (FedKTL's prototype dimension)."""
    return MethodContext(
        num_classes=num_classes,
        proto_dim=num_classes if proto_dim is None else proto_dim,
        class_names=list(class_names) if class_names is not None else None,
        device=device,
        seed=seed,
        generator=generator,
    )


def method_settings(config: SimulateConfig) -> MethodSettings:
    """The sections of ``config`` that its method reads; a privacy budget without ``privacy.rounds``
    covers the run's rounds. A DP setting the method cannot apply is refused, never ignored."""
    cls = get_method(config.method)
    privacy = config.section("privacy", PrivacySettings)
    if privacy.epsilon is not None and "privacy" not in cls.settings_model.sections():
        raise ConfigError(f"privacy.epsilon is not available for method {config.method!r}")
    if privacy.rounds is None:
        config = config.model_copy(update={"privacy": privacy.model_copy(update={"rounds": config.rounds})})
    return cls.settings_from(config)


def build_method(
    config: SimulateConfig,
    num_classes: int,
    class_names: Sequence[str] | None,
    device: torch.device,
    *,
    server: bool = True,
) -> Method:
    """``config.method`` with its own settings; the generator is loaded only for a server side of a method
    that uses one (a client never runs it)."""
    cls = get_method(config.method)
    generator = load_generator(config.generator, device) if server and cls.uses_generator else None
    ctx = method_context(
        num_classes=num_classes, class_names=class_names, device=device, seed=config.seed, generator=generator
    )
    return cls(method_settings(config), ctx)


def build_client(
    config: SimulateConfig, data: FederatedData, index: int, etf: torch.Tensor, device: torch.device
) -> LocalClient:
    """Client ``index``: model ``config.models[index % len]``, initialised from its own derived seed (the
    global RNG is left as it was), on data split ``index``. The same in every transport. With
    ``study.pretrained`` it starts from the weights an earlier run saved for it."""
    name = config.models[index % len(config.models)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "model", index))
        model = ClientModel.build(
            name, num_channels=data.num_channels, image_size=data.image_size, proto_dim=etf.shape[0]
        )
    client = LocalClient(
        client_id=f"client-{index:02d}-{name}",
        model=model,
        data=data.clients[index],
        etf=etf,
        settings=config.client,
        device=device,
        seed=derive_seed(config.seed, "batches", index),
    )
    if config.study.pretrained is not None:
        load_client_weights(client, config.study.pretrained)
    return client


def build_clients(
    config: SimulateConfig, data: FederatedData, etf: torch.Tensor, device: torch.device
) -> list[LocalClient]:
    """One client per data split (see `build_client`)."""
    return [build_client(config, data, i, etf, device) for i in range(len(data.clients))]


def evaluate_clients(clients: Sequence[LocalClient]) -> tuple[float, list[float | None]]:
    """Test-sample-weighted mean accuracy over clients (PFLlib's figure) and each client's accuracy."""
    return weighted_accuracy([client.evaluate() for client in clients])


def weighted_accuracy(scores: Sequence[Score | None]) -> tuple[float, list[float | None]]:
    """The test-sample-weighted mean over the clients scored, and each client's accuracy (None: not
    scored)."""
    scored = [s for s in scores if s is not None]
    accuracy = sum(c for c, _ in scored) / max(1, sum(t for _, t in scored))
    return accuracy, [s[0] / s[1] if s is not None and s[1] else None for s in scores]


def prepare_run_dir(config: SimulateConfig, *, overwrite: bool = False, prefix: str = "") -> Path:
    """Create the run folder; refuse to write into a non-empty one unless ``overwrite``."""
    if config.out is not None:
        run_dir = Path(config.out)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{prefix}{config.method}-{config.preset or 'custom'}-s{config.seed}-{stamp}"
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"run folder {run_dir} already exists and is not empty; choose another --out or pass --overwrite"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# -- one round's plan and replies -----------------------------------------------------------------------


@dataclass(frozen=True)
class RoundPlan:
    """What the runner asks of a round: its index (of ``rounds``), the chosen clients (indices in client
    order) and whether it is evaluated."""

    round: int
    rounds: int | None  # None: not known (a participant of a server's open-ended federation)
    chosen: list[int]
    evaluate: bool


@dataclass
class Reply:
    """One chosen client's answer to a round. ``missed``: why it did not report (``dropout``,
    ``straggler``; ``failure`` when the transport got no answer; ``invalid`` when its payload did not pass
    the method's validation); ``score`` when it was evaluated with its training."""

    index: int
    client_id: str
    payload: bytes | None = None
    stats: TrainStats | None = None
    missed: str | None = None
    score: Score | None = None


@dataclass
class RoundReplies:
    """A round's replies (in client order); ``total``: the sum of the summands when the transport summed
    them securely (the server never sees one)."""

    replies: list[Reply] = field(default_factory=list)
    total: bytes | None = None


def client_step(
    method: Method, client: LocalClient, index: int, plan: RoundPlan, config: SimulateConfig | None = None
) -> Reply:
    """One chosen client's round, wherever it runs: with a study's ``config`` it may miss the round
    (``study.dropout``, ``study.round_budget``: a seeded draw per client and round); else it trains at the
    round's learning rate and returns the method's payload."""
    if config is not None:
        reason = miss_reason(
            config.study,
            config.seed,
            plan.round,
            index,
            num_train=client.num_train,
            epochs=config.client.epochs,
        )
        if reason is not None:
            return Reply(index, client.client_id, missed=reason)
    client.start_round(plan.round, plan.rounds)
    update = method.client_update(client, plan.round)
    return Reply(index, client.client_id, payload=update.payload, stats=update.stats)


def published_files(method: Method, update: ServerUpdate) -> dict[str, bytes]:
    """What a round publishes: the method's files and the broadcast (under `Method.broadcast_file`) — the
    same names in a run folder and on a server."""
    files = dict(update.files)
    if update.payload is not None:
        files[method.broadcast_file] = update.payload
    return files


def server_work(method: Method, uploads: Mapping[str, bytes], round_index: int) -> Work[ServerUpdate]:
    """The server step as resumable work: the method's steps on the round's input (the uploads, or a
    ``"sum"`` method's sum); `Transport.server_update` runs it to the end, a ktl server in slices."""
    return method.server_steps(method.server_input(uploads), round_index)


def participate(
    method: Method,
    client: LocalClient,
    rounds: range,
    *,
    upload: Callable[[int, Reply, Score], object],
    broadcast: Callable[[int], bytes | None],
    report: Callable[[int, Score], None] | None = None,
) -> list[Score]:
    """One client of a remote runner (``ktl client run``): for each round, the client step, its own score,
    ``upload(r, reply, score)`` of its payload, then the round's broadcast (None: the round failed; the
    client keeps what it had) and ``report(r, score)``."""
    scores: list[Score] = []
    for r in rounds:
        reply = client_step(method, client, 0, RoundPlan(r, None, [0], True))
        scores.append(client.evaluate())
        if reply.payload is not None:
            upload(r, reply, scores[-1])
        taken = broadcast(r)
        if taken is not None:
            method.client_receive(client, taken)
        if report is not None:
            report(r, scores[-1])
    return scores


@dataclass(frozen=True)
class Federation:
    """What a transport learns when it opens: the clients (in client order) and the classes."""

    client_ids: list[str]
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class Transport(ABC):
    """How the runner reaches its clients. A transport moves bytes; it keeps no round loop."""

    name: ClassVar[str]
    method: Method | None = None

    @abstractmethod
    def open(self, config: SimulateConfig) -> Federation:
        """Connect (or build) the clients; called once, before the method is built."""

    def bind(self, method: Method) -> None:
        """The runner's method (a transport running client steps in this process uses it on them)."""
        self.method = method

    @property
    def bound(self) -> Method:
        """The method `bind` gave."""
        if self.method is None:
            raise RuntimeError("the transport has no method: the runner binds one before the first round")
        return self.method

    @abstractmethod
    def train(self, plan: RoundPlan, broadcast: bytes | None) -> RoundReplies:
        """The chosen clients' client steps (``broadcast``: the last one, not yet delivered to them by
        `deliver`); a reply per chosen client, failures included."""

    @abstractmethod
    def evaluate(self, plan: RoundPlan, replies: RoundReplies, broadcast: bytes | None) -> list[Score | None]:
        """Every client's score (client order); those scored with their training are in ``replies``."""

    def evaluate_global(self, plan: RoundPlan) -> list[Score | None] | None:
        """Every client's score on the held-out global test set (``data.global_test_size``), client order;
        None when there is none or the clients are out of reach (Flower: they live on the nodes)."""
        return None

    def server_update(
        self, method: Method, plan: RoundPlan, server_input: Mapping[str, bytes]
    ) -> ServerUpdate | None:
        """The round's server step on its input (the uploads, or a ``"sum"`` method's sum): here, by the
        runner's method (the HTTP transport: on the server, `server_work`)."""
        return method.server_update(server_input, plan.round) if server_input else None

    def server_method(self, method: Method) -> Method:
        """The method whose server step ran (its round files and artefacts go into the run folder)."""
        return method

    def deliver(self, plan: RoundPlan, broadcast: bytes) -> int:
        """Give every client the round's broadcast; returns the bytes that went down (a transport that
        sends it with the next round's message counts it there: 0 here)."""
        return 0

    def wire_bytes(self) -> int:
        """Bytes this transport moved so far, both ways (its own encoding)."""
        return 0

    def save_clients(self, run_dir: Path) -> bool:
        """Write the clients' weights into the run folder, where the runner holds them."""
        return False

    def facts(self) -> dict[str, Any]:
        """The transport's own facts for ``summary.json`` (``transport``)."""
        return {"name": self.name}

    def close(self) -> None:
        return None


class HeldClients(Transport, ABC):
    """A transport whose clients live in this process (``ktl simulate``, ``ktl demo``): it counts the bytes
    it moves and saves the clients' weights into the run folder."""

    clients: list[LocalClient]
    moved: int
    global_test: GlobalTest | None = None  # the federation's data's held-out set, set when it is built

    def wire_bytes(self) -> int:
        return self.moved

    def evaluate_global(self, plan: RoundPlan) -> list[Score | None] | None:
        test = self.global_test
        if test is None:
            return None
        return [client.evaluate_on(test.x, test.y) for client in self.clients]

    def save_clients(self, run_dir: Path) -> bool:
        save_client_weights(self.clients, run_dir)
        return True


class LocalTransport(HeldClients):
    """``ktl simulate``: every client in this process, the broadcast's bytes given to each."""

    name = "in-process"

    def __init__(self, config: SimulateConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.clients = []
        self.moved = 0

    def open(self, config: SimulateConfig) -> Federation:
        data = build_federated_data(config.data, num_clients=config.num_clients, seed=config.seed)
        etf = simplex_etf(data.num_classes, data.num_classes, seed=config.etf_seed)  # K = C
        self.clients = build_clients(config, data, etf, self.device)
        self.global_test = data.global_test
        return Federation([c.client_id for c in self.clients], list(data.class_names), data.source)

    def train(self, plan: RoundPlan, broadcast: bytes | None) -> RoundReplies:
        replies = [client_step(self.bound, self.clients[i], i, plan, self.config) for i in plan.chosen]
        self.moved += sum(len(r.payload) for r in replies if r.payload is not None)
        return RoundReplies(replies)

    def evaluate(self, plan: RoundPlan, replies: RoundReplies, broadcast: bytes | None) -> list[Score | None]:
        return [client.evaluate() for client in self.clients]

    def deliver(self, plan: RoundPlan, broadcast: bytes) -> int:
        for client in self.clients:  # participants or not
            self.bound.client_receive(client, broadcast)
        self.moved += len(broadcast) * len(self.clients)
        return len(broadcast) * len(self.clients)


# -- the runner ------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


class Runner:
    """A federation, top to bottom, over any `Transport`: open → method → run folder → rounds (plan →
    train → validate → evaluate → server step → deliver → metrics line → early stop) → the last broadcast,
    the method's files and artefacts, client weights → ``summary.json``."""

    def __init__(
        self,
        config: SimulateConfig,
        transport: Transport,
        *,
        overwrite: bool = False,
        progress: bool = True,
        run_dir: Path | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.config = config
        self.transport = transport
        self.overwrite = overwrite
        self.progress = progress
        self.run_dir = run_dir
        self.log = log or logger
        self.device = resolve_device(config.device)

    def validated(self, method: Method, replies: RoundReplies) -> dict[str, bytes]:
        """The round's uploads (client id → bytes, client order) that pass the method's validation; a
        reply that does not is that client's failure (``missed``: ``invalid``), and the round goes on."""
        uploads: dict[str, bytes] = {}
        for reply in sorted(replies.replies, key=lambda x: x.index):
            if reply.payload is None or reply.missed is not None:
                continue
            try:
                method.validate_upload(reply.payload)
            except PayloadError as exc:
                self.log.warning(
                    "round: %s sent an invalid upload (%s); counted as failed", reply.client_id, exc
                )
                reply.missed, reply.payload, reply.stats = "invalid", None, None
                continue
            uploads[reply.client_id] = reply.payload
        return uploads

    def run(self) -> dict[str, Any]:
        """Run the federation; returns the summary (also written to ``summary.json``)."""
        try:
            return self._run()
        finally:
            self.transport.close()

    def _run(self) -> dict[str, Any]:
        config, transport, log = self.config, self.transport, self.log
        t_start = time.perf_counter()
        torch.manual_seed(derive_seed(config.seed, "global"))
        federation = transport.open(config)
        clients = federation.client_ids
        method = build_method(config, federation.num_classes, federation.class_names, self.device)
        transport.bind(method)
        run_dir = self.run_dir or prepare_run_dir(config, overwrite=self.overwrite)
        resolved = config.model_copy(update={"out": run_dir})
        (run_dir / "config.json").write_text(resolved.model_dump_json(indent=2) + "\n")
        log.info(
            "%s on %s (%s): %d clients (%s), %d rounds, device %s → %s",
            config.method,
            federation.source,
            transport.name,
            len(clients),
            ", ".join(config.models),
            config.rounds,
            self.device,
            run_dir,
        )
        for key, value in method.describe().items():
            log.info("%s: %s", key, value)

        study = config.study
        history: list[float | None] = []
        plateau = Plateau(study.patience, study.min_delta)
        stopped: dict[str, Any] | None = None
        bytes_up = bytes_down = failures = 0
        broadcast: bytes | None = None
        published: dict[str, bytes] = {}  # the last broadcast and the files the method publishes beside it
        bar = tqdm(
            total=config.rounds * len(clients), desc=config.method, unit="client", disable=not self.progress
        )
        with (run_dir / "metrics.jsonl").open("w") as metrics_file:
            for r in range(1, config.rounds + 1):
                t_round = time.perf_counter()
                wire_before = transport.wire_bytes()
                plan = RoundPlan(
                    r, config.rounds, participants(study, config.seed, r, len(clients)),
                    is_evaluated(study, r, config.rounds),
                )  # fmt: skip
                replies = transport.train(plan, broadcast)
                bar.update(len(clients))
                t_trained = time.perf_counter()
                uploads = self.validated(method, replies)
                accuracy: float | None = None
                client_accuracy: list[float | None] | None = None
                if plan.evaluate:
                    accuracy, client_accuracy = weighted_accuracy(
                        transport.evaluate(plan, replies, broadcast)
                    )
                # Every client on the same held-out images: the sample-weighted mean is the clients' mean.
                global_accuracy: float | None = None
                global_client_accuracy: list[float | None] | None = None
                global_scores = (
                    transport.evaluate_global(plan)
                    if is_globally_evaluated(study, r, config.rounds)
                    else None
                )
                if global_scores is not None:
                    global_accuracy, global_client_accuracy = weighted_accuracy(global_scores)
                elif config.data.global_test_size and r == config.rounds:
                    log.warning("data.global_test_size: the %s transport cannot score the clients on the "
                                "global test set (global_accuracy is null)", transport.name)  # fmt: skip
                # The server step's input: the uploads, or for a "sum" method their sum alone.
                server_input: Mapping[str, bytes] = {SUM_UPLOAD: replies.total} if replies.total else {}
                if replies.total is None and uploads:
                    server_input = method.server_input(uploads)
                server = transport.server_update(method, plan, server_input)
                round_down = 0
                if server is not None:
                    transport.server_method(method).save_round(run_dir, r, server_input)
                    published = published_files(method, server)
                    if server.payload is not None:
                        broadcast = server.payload
                        round_down = len(server.payload) * len(clients)
                        transport.deliver(plan, server.payload)
                stats = [x.stats for x in replies.replies if x.stats is not None]
                missed = {x.client_id: x.missed for x in replies.replies if x.missed is not None}
                failures += sum(1 for reason in missed.values() if reason in ("failure", "invalid"))
                round_up = sum(len(p) for p in uploads.values()) if replies.total is None else None
                bytes_up += round_up or 0
                bytes_down += round_down
                record = {
                    "round": r,
                    "accuracy": accuracy,
                    "client_accuracy": client_accuracy,
                    "evaluated": plan.evaluate,
                    "global_accuracy": global_accuracy,
                    "global_client_accuracy": global_client_accuracy,
                    "lr": scheduled_lr(config.client, r, config.rounds),
                    "participants": plan.chosen,
                    "trained": len(stats),
                    "missed": missed,
                    "train_loss": _mean([s.supervised_loss for s in stats]),
                    "distill_loss": _mean([s.distill_loss for s in stats]),
                    "skipped_steps": sum(s.skipped for s in stats),
                    "bytes_up": round_up,
                    "bytes_down": round_down,
                    "wire_bytes": transport.wire_bytes() - wire_before,
                    "train_seconds": t_trained - t_round,
                    "round_seconds": time.perf_counter() - t_round,
                    **(server.metrics if server is not None else {}),
                }
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                history.append(accuracy)
                if accuracy is None:
                    log.info("round %d/%d  not evaluated  %.1fs", r, config.rounds, record["round_seconds"])
                    continue
                bar.set_postfix(round=r, acc=f"{accuracy:.4f}")
                log.info(
                    "round %d/%d  accuracy %.4f  (best %.4f, %d/%d trained)  %.1fs",
                    r, config.rounds, accuracy, max(a for a in history if a is not None), len(stats),
                    len(plan.chosen), record["round_seconds"],
                )  # fmt: skip
                if plateau.update(accuracy):
                    stopped = {"round": r, "reason": plateau.reason()}
                    log.info("early stop after round %d: %s", r, stopped["reason"])
                    break
        bar.close()

        for name, content in published.items():
            (run_dir / name).write_bytes(content)
        artifacts = {name: name for name in published}
        server_side = transport.server_method(method)
        artifacts.update(server_side.save_artifacts(run_dir))
        if transport.save_clients(run_dir):
            artifacts[CLIENT_WEIGHTS] = f"{CLIENT_WEIGHTS}/"
        scored = {i + 1: a for i, a in enumerate(history) if a is not None}
        best_round = max(scored, key=lambda k: (scored[k], -k))
        n_transfers = len(clients) * len(history)
        summary: dict[str, Any] = {
            "method": config.method,
            "preset": config.preset,
            "seed": config.seed,
            "rounds": config.rounds,
            "rounds_run": len(history),
            "stopped_early": stopped,
            "num_clients": len(clients),
            "models": config.models,
            "data": federation.source,
            "class_names": federation.class_names,
            "accuracy": history,
            "final_accuracy": scored[max(scored)],
            "best_accuracy": scored[best_round],
            "best_round": best_round,
            "failures": failures,
            "bytes_up_per_client_round": bytes_up / n_transfers,
            "bytes_down_per_client_round": bytes_down / n_transfers,
            "wall_time_s": time.perf_counter() - t_start,
            "device": str(self.device),
            "transport": transport.facts(),
            **server_side.describe(),
            "artifacts": artifacts,
            "versions": versions(),
            "host": host_facts(),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info(
            "final accuracy %.4f, best %.4f (round %d); run folder: %s",
            summary["final_accuracy"],
            summary["best_accuracy"],
            summary["best_round"],
            run_dir,
        )
        return summary
