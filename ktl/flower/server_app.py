"""ktl's ServerApp: each round, the previous broadcast goes to the sampled nodes with the round number;
their replies (the method's payloads, as Flower records) go through the method's server step — the same
`Method` ``ktl simulate`` and ``ktl serve`` drive. Nodes that fail mid-round are counted and the round goes
on with the replies it got (Flower's way)."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, cast

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ktl.config import SimulateConfig
from ktl.data import build_federated_data
from ktl.device import resolve_device
from ktl.flower.config import FlowerOptions, from_run_config
from ktl.flower.records import from_record, to_record
from ktl.seeding import derive_seed
from ktl.simulate import build_method

__all__ = ["app", "make_server_app", "run_rounds"]

logger = logging.getLogger(__name__)


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float = 600.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of the {minimum} nodes connected within {timeout:.0f}s")
        time.sleep(0.5)
    return nodes


def run_rounds(grid: Grid, config: SimulateConfig, options: FlowerOptions) -> dict[str, Any]:
    """The federation on Flower, top to bottom; returns the summary (also in ``flower.out`` if set)."""
    t_start = time.perf_counter()
    torch.manual_seed(derive_seed(config.seed, "global"))
    data = build_federated_data(config.data, num_clients=config.num_clients, seed=config.seed)
    device = resolve_device(config.device)
    method = build_method(config, data.num_classes, data.class_names, device)
    nodes = _wait_for_nodes(grid, max(options.min_nodes, 1))
    logger.info("%s on Flower: %d nodes, %d rounds", config.method, len(nodes), config.rounds)
    out = Path(options.out) if options.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(config.model_dump_json(indent=2) + "\n")
    broadcast: bytes | None = None
    history: list[dict[str, Any]] = []
    for r in range(1, config.rounds + 1):
        t_round = time.perf_counter()
        nodes = sorted(grid.get_node_ids())
        k = max(1, min(len(nodes), round(options.fraction * len(nodes))))
        sampled = sorted(random.Random(derive_seed(config.seed, "flower-sample", r)).sample(nodes, k))
        content = RecordDict({"config": ConfigRecord({"round": r})})
        sent = broadcast
        if sent is not None:
            content["broadcast"] = to_record(sent)
        messages = [
            Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(r))
            for node in sampled
        ]
        replies = list(grid.send_and_receive(messages, timeout=options.round_timeout))
        good = [m for m in replies if not m.has_error()]
        # Uploads in the clients' order (their partition ids), as ktl simulate and the server order them.
        good.sort(key=lambda m: cast(int, m.content.config_records["meta"]["partition-id"]))
        uploads = {
            str(m.content.config_records["meta"]["client-id"]): from_record(
                m.content.array_records["payload"]
            )
            for m in good
            if "payload" in m.content.array_records
        }
        metrics = [m.content.metric_records["metrics"] for m in good]
        correct = sum(cast(float, x["correct"]) for x in metrics)
        total = sum(cast(float, x["total"]) for x in metrics)
        server = method.server_update(uploads, r) if uploads else None
        if server is not None and server.payload is not None:
            broadcast = server.payload
        record = {
            "round": r,
            "accuracy": correct / max(total, 1.0),
            "sampled": len(sampled),
            "replies": len(good),
            "failures": len(sampled) - len(good),
            "bytes_up": sum(len(p) for p in uploads.values()),
            "bytes_down": len(sent) * len(sampled) if sent is not None else 0,  # last round's broadcast
            "round_seconds": time.perf_counter() - t_round,
            **(server.metrics if server is not None else {}),
        }
        history.append(record)
        logger.info(
            "round %d/%d  accuracy %.4f  (%d/%d replies)  %.1fs",
            r,
            config.rounds,
            record["accuracy"],
            len(good),
            len(sampled),
            record["round_seconds"],
        )
        if out is not None:
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
    accuracies = [h["accuracy"] for h in history]
    summary = {
        "method": config.method,
        "transport": "flower",
        "rounds": config.rounds,
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "accuracy": accuracies,
        "failures": sum(h["failures"] for h in history),
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
        summary = run_rounds(grid, resolved, opts)
        if result is not None:
            result.update(summary)

    return app


app = make_server_app()
