"""ktl's ServerApp: the federation is `ktl.runner.Runner`'s — the round every transport runs — over a
`GridTransport`: each round the previous broadcast goes to the chosen nodes (``study.join_ratio``,
``study.min_clients``: the same seeded draw as ``ktl simulate``, over the nodes in partition order) with
the round number; their replies (the method's payloads, as Flower records) are validated by the method at
the runner's edge and go through its server step. Nodes that fail mid-round, or send an invalid payload,
are counted and the round goes on with the replies it got (Flower's way). A method whose uploads are
summands (``fedproto-secagg``, ``fedktl-secagg``) runs each round under Flower's SecAgg+
(`ktl.flower.secagg`): the server step gets only the sum. Bytes are counted as Flower's wire encoding of
every message's content, both ways (``wire_bytes``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import LOGGER_NAME
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from ktl.clients import TrainStats
from ktl.config import SimulateConfig
from ktl.errors import ConfigError
from ktl.flower.config import FlowerOptions, from_run_config, participation
from ktl.flower.records import from_record, to_record
from ktl.flower.secagg import secure_sum_round
from ktl.methods import get_method
from ktl.runner import Federation, Reply, RoundPlan, RoundReplies, Runner, Score, Transport, prepare_run_dir

__all__ = ["CountingGrid", "GridTransport", "app", "make_server_app", "run_rounds"]

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


def _train_content(plan: RoundPlan, broadcast: bytes | None) -> RecordDict:
    content = RecordDict(
        {"config": ConfigRecord({"round": plan.round, "rounds": plan.rounds or 0, "evaluate": plan.evaluate})}
    )
    if broadcast is not None:
        content["broadcast"] = to_record(broadcast)
    return content


def _score(metrics: Mapping[str, Any]) -> Score | None:
    return (int(metrics["correct"]), int(metrics["total"])) if "total" in metrics else None


class GridTransport(Transport):
    """The runner's transport over Flower's ``Grid`` (Simulation and Deployment Engines): one SuperNode per
    client. Opening asks every node (a ``query`` message) for its partition, client id and classes, so the
    ServerApp builds no data set; a round's broadcast goes to the chosen nodes with the round (``train``),
    nodes not trained that round are scored by an ``evaluate`` message; a ``"sum"`` method's round runs
    under SecAgg+ (`secure_sum_round`). A node that errs or does not answer is that client's failure and
    the round goes on with the others (Flower's way)."""

    name = "flower"

    def __init__(self, grid: Grid, options: FlowerOptions, context: Context | None = None) -> None:
        self.grid = CountingGrid(grid)
        self.options = options
        self.context = context
        self.nodes: list[int] = []  # node ids in client order (their partition ids)
        self.client_ids: list[str] = []

    def open(self, config: SimulateConfig) -> Federation:
        secure = get_method(config.method).aggregation == "sum"
        if secure and self.context is None:
            raise ValueError(
                f"method {config.method!r} runs under SecAgg+, which needs the ServerApp's context"
            )
        nodes = _wait_for_nodes(self.grid, max(self.options.min_nodes, 2 if secure else 1))
        messages = [
            Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in nodes
        ]
        answers = self.exchange(messages)
        good = [m for m in answers if not m.has_error()]
        if not good:
            raise RuntimeError(
                f"none of the {len(nodes)} nodes answered ktl's query (see the SuperNodes' logs)"
            )
        good.sort(key=lambda m: cast(int, m.content.config_records["meta"]["partition-id"]))
        metas = [m.content.config_records["meta"] for m in good]
        names = [list(cast(list[str], meta["class-names"])) for meta in metas]
        if any(n != names[0] for n in names):
            raise ConfigError("the SuperNodes disagree on the federation's classes (their data differ)")
        self.nodes = [m.metadata.src_node_id for m in good]
        self.client_ids = [str(meta["client-id"]) for meta in metas]
        logger.info(
            "%s on Flower: %d of %d nodes answered, %d rounds%s",
            config.method, len(good), len(nodes), config.rounds, " (SecAgg+)" if secure else "",
        )  # fmt: skip
        return Federation(self.client_ids, names[0], str(metas[0]["source"]))

    def exchange(self, messages: list[Message]) -> list[Message]:
        """Push ``messages`` and pull their replies every 0.1 s until all arrived or
        ``flower.round-timeout`` ran out (Flower's own ``send_and_receive`` looks every 3 s: up to 3 s lost
        per exchange)."""
        ids = [i for i in self.grid.push_messages(messages) if i]
        replies: list[Message] = []
        deadline = time.monotonic() + self.options.round_timeout
        while ids and time.monotonic() < deadline:
            got = list(self.grid.pull_messages(ids))
            replies += got
            answered = {m.metadata.reply_to_message_id for m in got}
            ids = [i for i in ids if i not in answered]
            if ids:
                time.sleep(0.1)
        return replies

    def _reply(
        self, index: int, metrics: Mapping[str, Any], missed: str | None, payload: bytes | None
    ) -> Reply:
        stats = None
        if missed is None:
            stats = TrainStats(
                steps=int(metrics.get("steps", 0)),
                skipped=int(metrics["skipped-steps"]),
                supervised_loss=float(metrics["train-loss"]),
                distill_loss=float(metrics["distill-loss"]),
            )
        return Reply(index, self.client_ids[index], payload, stats, missed, _score(metrics))

    def train(self, plan: RoundPlan, broadcast: bytes | None) -> RoundReplies:
        index_of = {node: i for i, node in enumerate(self.nodes)}
        sampled = [self.nodes[i] for i in plan.chosen]
        got: dict[int, Reply] = {}
        total = None
        if self.method is not None and self.method.aggregation == "sum":
            secured = secure_sum_round(
                self.grid,
                cast(Context, self.context),
                sampled,
                plan.round,
                broadcast,
                self.method.summand_layout(),
                shares=self.options.secagg_shares,
                threshold=self.options.secagg_threshold,
                timeout=self.options.round_timeout,
            )
            for metrics in secured.metrics:  # the summands never reach the server: only their sum
                i = int(metrics["partition-index"])
                got[i] = self._reply(i, metrics, None, None)
            total = secured.total
        else:
            messages = [
                Message(_train_content(plan, broadcast), dst_node_id=node, message_type=MessageType.TRAIN,
                        group_id=str(plan.round))
                for node in sampled
            ]  # fmt: skip
            for m in self.exchange(messages):
                found = index_of.get(m.metadata.src_node_id)
                if found is None or m.has_error():
                    continue
                i = found
                meta = m.content.config_records["meta"]
                missed = str(meta["missed"]) if "missed" in meta else None
                payload = (
                    from_record(m.content.array_records["payload"])
                    if "payload" in m.content.array_records
                    else None
                )
                got[i] = self._reply(i, m.content.metric_records["metrics"], missed, payload)
        replies = [got.get(i) or Reply(i, self.client_ids[i], missed="failure") for i in plan.chosen]
        return RoundReplies(replies, total)

    def evaluate(self, plan: RoundPlan, replies: RoundReplies, broadcast: bytes | None) -> list[Score | None]:
        scores: list[Score | None] = [None] * len(self.nodes)
        for reply in replies.replies:
            scores[reply.index] = reply.score
        rest = [i for i, s in enumerate(scores) if s is None]
        if rest:  # clients not trained this round (or that missed it) are scored too, as in ktl simulate
            content = _train_content(plan, broadcast)
            messages = [
                Message(content, dst_node_id=self.nodes[i], message_type=MessageType.EVALUATE,
                        group_id=str(plan.round))
                for i in rest
            ]  # fmt: skip
            index_of = {node: i for i, node in enumerate(self.nodes)}
            for m in self.exchange(messages):
                i = index_of.get(m.metadata.src_node_id)
                if i is not None and not m.has_error():
                    scores[i] = _score(m.content.metric_records["metrics"])
        return scores

    def wire_bytes(self) -> int:
        return self.grid.bytes_sent + self.grid.bytes_received

    def facts(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "nodes": len(self.nodes),
            "bytes_sent": self.grid.bytes_sent,
            "bytes_received": self.grid.bytes_received,
        }


def run_rounds(
    grid: Grid, config: SimulateConfig, options: FlowerOptions, context: Context | None = None
) -> dict[str, Any]:
    """The federation on Flower: `Runner` over a `GridTransport`; returns the summary (also in the run
    folder: ``flower.out``, else ``out``, else runs/flower-…). ``context`` is the ServerApp's (needed by a
    secure-aggregation method)."""
    config = config.model_copy(update={"study": participation(config, options)})
    if options.out:
        config = config.model_copy(update={"out": Path(options.out)})
    run_dir = prepare_run_dir(config, prefix="flower-")
    transport = GridTransport(grid, options, context)
    return Runner(config, transport, run_dir=run_dir, progress=False, log=logger).run()


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
