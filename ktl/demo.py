"""``ktl demo``: the whole system on one machine — a ktl server on 127.0.0.1 (a free port) and N
heterogeneous clients that train on Fashion-MNIST partitions and talk to it through the SDK over real
HTTP, round after round, with any method that exchanges payloads (``--method``).

The clients are built as ``ktl simulate`` builds them and drive the same method steps, so with the same
seed, clients and rounds the demo reproduces ``ktl simulate``'s per-round accuracies.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ktl.api import ServerSettings, create_app
from ktl.api.process import ServerThread, free_port
from ktl.clients.sdk import KtlHttpClient
from ktl.config import SimulateConfig, build_config
from ktl.data import FederatedData, build_federated_data
from ktl.device import resolve_device
from ktl.errors import ConfigError, DataError, KtlError
from ktl.methods import get_method
from ktl.participant import method_for_federation, take_broadcast, train_and_upload
from ktl.seeding import derive_seed
from ktl.simulate import build_clients, evaluate_clients, method_settings

__all__ = ["DemoOptions", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    rounds: int = 5  # communication rounds
    clients: int = 20  # heterogeneous clients (the cpu-small zoo, round-robin)
    seed: int = 0
    preset: str = "cpu-small"  # data, models and local training of this preset
    out: Path | None = None  # run folder; default runs/demo-<time>
    keep_serving: bool = False  # leave the server up (Ctrl-C to stop) for a look at /docs and the grids
    method: str = "fedktl"  # any registered method that exchanges payloads
    overrides: dict[str, Any] = field(default_factory=dict)  # settings, as `ktl simulate` takes them


def run_demo(options: DemoOptions) -> dict[str, object]:
    config = build_config(
        preset=options.preset,
        overrides={
            **options.overrides,
            "num_clients": options.clients,
            "rounds": options.rounds,
            "seed": options.seed,
            "method": options.method,
        },
    )
    if not get_method(config.method).exchanges:
        raise ConfigError(
            f"method {config.method!r} exchanges nothing over a server; run it with ktl simulate"
        )
    try:
        data = build_federated_data(config.data, num_clients=config.num_clients, seed=config.seed)
    except DataError as exc:
        logger.warning("NOTICE: %s", exc)
        logger.warning("NOTICE: the demo continues on the SYNTHETIC data set instead of Fashion-MNIST")
        config = config.model_copy(
            update={"data": config.data.model_copy(update={"dataset": "synthetic", "fraction": 1.0})}
        )
        data = build_federated_data(config.data, num_clients=config.num_clients, seed=config.seed)

    torch.manual_seed(derive_seed(config.seed, "global"))
    out = options.out or Path("runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    host, port = "127.0.0.1", free_port()
    admin_token = "ktl_" + secrets.token_urlsafe(24)  # never starts with "-" (see add_client)
    settings = ServerSettings(
        data_dir=out / "server",
        host=host,
        port=port,
        admin_token=admin_token,
        device=config.device,
        generators={"default": config.generator},
    )
    server = ServerThread(create_app(settings), host, port).start()
    logger.info(
        "ktl server on %s (API docs: %s/docs), state in %s", server.url, server.url, settings.data_dir
    )
    try:
        return _run_clients(config, data, server.url, admin_token, options, out)
    finally:
        if options.keep_serving:
            logger.info("serving on %s until Ctrl-C (admin token: %s)", server.url, admin_token)
            try:
                while server.thread.is_alive():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        server.stop()


def _run_clients(
    config: SimulateConfig, data: FederatedData, url: str, admin_token: str, options: DemoOptions, out: Path
) -> dict[str, object]:
    admin = KtlHttpClient(url, admin_token)
    # The federation carries the method's settings sections, resolved as ktl simulate resolves them (a
    # privacy budget covers the demo's rounds).
    settings = method_settings(config)
    fed = admin.create_federation(
        {
            "name": "demo",
            "method": config.method,
            "num_classes": data.num_classes,
            "class_names": data.class_names,
            "quorum": len(data.clients),
            "round_deadline_s": 600,
            "seed": config.seed,
            "etf_seed": config.etf_seed,
            **settings.model_dump(mode="json"),
        }
    )
    fid = fed["id"]
    generator = fed["generator"]["description"] if fed["generator"] else "none"
    logger.info(
        "federation %s: %s, %d classes, generator: %s", fid, config.method, data.num_classes, generator
    )
    fed = admin.federation(fid)
    device = resolve_device(config.device)
    clients = build_clients(config, data, admin.etf(fid), device)
    sdks = [KtlHttpClient(url, admin.register_client(fid, c.client_id)["token"]) for c in clients]
    # The run seed seeds the clients' privacy noise, as in ktl simulate (a deployed client keeps its own).
    method = method_for_federation(fed, seed=config.seed, device=device)
    history = []
    failed: list[str] = []  # rounds the server did not publish
    metrics_path = out / "metrics.jsonl"
    with metrics_path.open("w") as metrics_file:
        for r in range(1, options.rounds + 1):
            t0 = time.perf_counter()
            for client, sdk in zip(clients, sdks, strict=True):
                train_and_upload(method, client, sdk, fid, r)
            accuracy, client_accuracy = evaluate_clients(clients)
            published = [
                take_broadcast(method, client, sdk, fid, r) for client, sdk in zip(clients, sdks, strict=True)
            ]
            state = admin.round(fid, r)
            if not all(published):
                failed.append(f"round {r}: {state.get('error') or state['state']}")
            history.append(accuracy)
            record = {
                "round": r,
                "accuracy": accuracy,
                "client_accuracy": client_accuracy,
                "state": state["state"],
                "bytes_up": state["bytes_received"],
                "round_seconds": time.perf_counter() - t0,
                **(state.get("stats") or {}),
            }
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            logger.info(
                "round %d/%d  accuracy %.4f  (%d uploads, round %s)  %.1fs",
                r,
                options.rounds,
                accuracy,
                state["uploads"],
                state["state"] if all(published) else "failed",
                record["round_seconds"],
            )
    round_dir = out / "server" / "federations" / fid / "rounds" / str(options.rounds)
    grid = round_dir / "pairs.png"
    if grid.is_file():
        logger.info("pairs grid: %s", grid.resolve())
        logger.info(
            "pairs grid URL: %s/v1/federations/%s/rounds/%d/pairs.png (bearer token needed)",
            url,
            fid,
            options.rounds,
        )
    logger.info("broadcast: %s/v1/federations/%s/rounds/%d/broadcast", url, fid, options.rounds)
    final = admin.federation(fid)
    if final["privacy"]:
        logger.info(
            "privacy: ε spent %.3f of %.3f", final["privacy"]["epsilon_spent"], final["privacy"]["epsilon"]
        )
    logger.info("final accuracy %.4f, best %.4f; metrics: %s", history[-1], max(history), metrics_path)
    for sdk in sdks:
        sdk.close()
    admin.close()
    if failed:  # the main job did not do its job: say so, and exit non-zero
        raise KtlError(f"{len(failed)} of {options.rounds} rounds failed on the server ({failed[0]})")
    return {
        "federation": fid,
        "method": config.method,
        "accuracy": history,
        "grid": str(grid) if grid.is_file() else None,
        "url": url,
        "privacy": final["privacy"],
    }
