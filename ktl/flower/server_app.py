"""ktl's ServerApp: each round, the previous broadcast goes to the sampled nodes (``study.join_ratio``,
``study.min_clients``: the same seeded draw as ``ktl simulate``, over the sorted node ids) with the round
number;
their replies (the method's payloads, as Flower records) go through the method's server step — the same
`Method` ``ktl simulate`` and ``ktl serve`` drive. Nodes that fail mid-round are counted and the round goes
on with the replies it got (Flower's way). A method whose uploads are summands (``fedproto-secagg``,
``fedktl-secagg``) runs each round under Flower's SecAgg+ (`ktl.flower.secagg`): the server step gets
only the sum. Bytes are counted as Flower's wire encoding of every message's content, both ways."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import LOGGER_NAME
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from ktl.config import SimulateConfig
from ktl.data import build_federated_data
from ktl.device import resolve_device
from ktl.flower.config import FlowerOptions, from_run_config, participation
from ktl.flower.records import from_record, to_record
from ktl.flower.secagg import secure_sum_round
from ktl.methods import SUM_UPLOAD
from ktl.seeding import derive_seed
from ktl.simulate import build_method
from ktl.study import Plateau, is_evaluated, participants

__all__ = ["CountingGrid", "app", "make_server_app", "run_rounds"]

# Through Flower's logger ("flwr"): the app's lines appear where Flower prints, in a SuperLink's or
# SuperNode's log as in a simulation.
logger = logging.getLogger(f"{LOGGER_NAME}.{__name__}")


class CountingGrid(Grid):
    """A Grid that counts the bytes of every message's content (Flower's protobuf encoding) it sends and
    receives — what a round costs on the wire, whatever protocol (plain or SecAgg+) drives it."""

    def __init__(self, grid: Grid) -> None:
        self.inner = grid
        self.bytes_sent = self.bytes_received = self.messages = 0

    @staticmethod
    def size(message: Message) -> int:
        return int(recorddict_to_proto(message.content).ByteSize()) if message.has_content() else 0

    def _sent(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        self.bytes_sent += sum(self.size(m) for m in out)
        self.messages += len(out)
        return out

    def _received(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        self.bytes_received += sum(self.size(m) for m in out)
        return out

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._sent(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._received(self.inner.pull_messages(message_ids))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._received(self.inner.send_and_receive(self._sent(messages), timeout=timeout))


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float = 600.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of the {minimum} nodes connected within {timeout:.0f}s")
        time.sleep(0.5)
    return nodes


def _plain_round(
    grid: Grid, sampled: list[int], r: int, broadcast: bytes | None, timeout: float, evaluate: bool = True
) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """Send the broadcast, collect each reply's payload and metrics (in the clients' order)."""
    content = RecordDict({"config": ConfigRecord({"round": r, "evaluate": evaluate})})
    if broadcast is not None:
        content["broadcast"] = to_record(broadcast)
    messages = [
        Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(r))
        for node in sampled
    ]
    good = [m for m in grid.send_and_receive(messages, timeout=timeout) if not m.has_error()]
    # Uploads in the clients' order (their partition ids), as ktl simulate and the server order them.
    good.sort(key=lambda m: cast(int, m.content.config_records["meta"]["partition-id"]))
    uploads = {
        str(m.content.config_records["meta"]["client-id"]): from_record(m.content.array_records["payload"])
        for m in good
        if "payload" in m.content.array_records
    }
    return uploads, [dict(m.content.metric_records["metrics"]) for m in good]


def run_rounds(
    grid: Grid, config: SimulateConfig, options: FlowerOptions, context: Context | None = None
) -> dict[str, Any]:
    """The federation on Flower, top to bottom; returns the summary (also in ``flower.out`` if set).
    ``context`` is the ServerApp's (needed by a secure-aggregation method)."""
    t_start = time.perf_counter()
    torch.manual_seed(derive_seed(config.seed, "global"))
    data = build_federated_data(config.data, num_clients=config.num_clients, seed=config.seed)
    device = resolve_device(config.device)
    method = build_method(config, data.num_classes, data.class_names, device)
    secure = method.aggregation == "sum"
    if secure and context is None:
        raise ValueError(f"method {config.method!r} runs under SecAgg+, which needs the ServerApp's context")
    grid = CountingGrid(grid)
    nodes = _wait_for_nodes(grid, max(options.min_nodes, 2 if secure else 1))
    logger.info(
        "%s on Flower: %d nodes, %d rounds%s",
        config.method,
        len(nodes),
        config.rounds,
        " (SecAgg+)" if secure else "",
    )
    out = Path(options.out) if options.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(config.model_dump_json(indent=2) + "\n")
    broadcast: bytes | None = None
    history: list[dict[str, Any]] = []
    study = participation(config, options)
    plateau = Plateau(study.patience, study.min_delta)
    stopped: dict[str, Any] | None = None
    for r in range(1, config.rounds + 1):
        t_round = time.perf_counter()
        sent_before, received_before = grid.bytes_sent, grid.bytes_received
        nodes = sorted(grid.get_node_ids())
        sampled = [nodes[i] for i in participants(study, config.seed, r, len(nodes))]
        evaluated = is_evaluated(study, r, config.rounds)
        sent = broadcast
        server_input: Mapping[str, bytes]
        payload_bytes: int | None
        if secure:
            secured = secure_sum_round(
                grid,
                cast(Context, context),
                sampled,
                r,
                broadcast,
                method.summand_layout(),
                shares=options.secagg_shares,
                threshold=options.secagg_threshold,
                timeout=options.round_timeout,
            )
            # The server step's one input: the unmasked sum (no client's summand is ever seen).
            server_input = {SUM_UPLOAD: secured.total} if secured.total is not None else {}
            metrics, payload_bytes = secured.metrics, None  # the summands never reach the server
        else:
            uploads, metrics = _plain_round(grid, sampled, r, broadcast, options.round_timeout, evaluated)
            payload_bytes = sum(len(p) for p in uploads.values())
            server_input = method.server_input(uploads) if uploads else {}
        # A client that missed the round (study.dropout, study.round_budget) answers without training.
        missed = sum(1 for x in metrics if float(x.get("missed", 0.0)) > 0)
        reported = [x for x in metrics if not float(x.get("missed", 0.0)) > 0]
        correct = sum(float(x["correct"]) for x in reported)
        total = sum(float(x["total"]) for x in reported)
        server = method.server_update(server_input, r) if server_input else None
        if server is not None and server.payload is not None:
            broadcast = server.payload
        # over the clients that reported (Flower evaluates where it trains); none when not evaluated
        accuracy = correct / max(total, 1.0) if evaluated else None
        record = {
            "round": r,
            "accuracy": accuracy,
            "evaluated": evaluated,
            "sampled": len(sampled),
            "replies": len(reported),
            "missed": missed,
            "failures": len(sampled) - len(metrics),
            "bytes_up": payload_bytes,  # the method's payloads, as ktl simulate counts them
            "bytes_sent": grid.bytes_sent - sent_before,  # Flower's encoding, every message of the round
            "bytes_received": grid.bytes_received - received_before,
            "broadcast_bytes": len(sent) if sent is not None else 0,
            "round_seconds": time.perf_counter() - t_round,
            **(server.metrics if server is not None else {}),
        }
        history.append(record)
        logger.info(
            "round %d/%d  accuracy %s  (%d/%d replies)  %.1fs",
            r,
            config.rounds,
            f"{accuracy:.4f}" if accuracy is not None else "not evaluated",
            len(reported),
            len(sampled),
            record["round_seconds"],
        )
        if out is not None:
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        if accuracy is not None and plateau.update(accuracy):
            stopped = {"round": r, "reason": plateau.reason()}
            logger.info("early stop after round %d: %s", r, stopped["reason"])
            break
    accuracies = [h["accuracy"] for h in history]
    scored = [a for a in accuracies if a is not None]
    summary = {
        "method": config.method,
        "transport": "flower",
        "rounds": config.rounds,
        "rounds_run": len(history),
        "stopped_early": stopped,
        "final_accuracy": scored[-1],
        "best_accuracy": max(scored),
        "accuracy": accuracies,
        "failures": sum(h["failures"] for h in history),
        "bytes_sent": grid.bytes_sent,
        "bytes_received": grid.bytes_received,
        "wall_time_s": time.perf_counter() - t_start,
    }
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def make_server_app(
    config: SimulateConfig | None = None,
    options: FlowerOptions | None = None,
    result: dict[str, Any] | None = None,
) -> ServerApp:
    """The ServerApp; with ``config`` its settings are fixed (``ktl flower simulate``; the summary lands in
    ``result``), else they come from the run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is not None:
            resolved, opts = config, options or FlowerOptions()
        else:
            resolved, opts = from_run_config(context.run_config)
        summary = run_rounds(grid, resolved, opts, context)
        if result is not None:
            result.update(summary)

    return app


app = make_server_app()
