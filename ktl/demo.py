"""``ktl demo``: the whole system on one machine — a ktl server on 127.0.0.1 (a free port) and N
heterogeneous clients that train on Fashion-MNIST partitions and talk to it through the SDK over real
HTTP, round after round.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from ktl.api import ServerSettings, create_app
from ktl.api.process import ServerThread, free_port
from ktl.clients.sdk import KtlHttpClient
from ktl.config import SimulateConfig, build_config
from ktl.data import FederatedData, build_federated_data
from ktl.device import resolve_device
from ktl.errors import DataError
from ktl.participant import take_pairs, train_and_upload
from ktl.seeding import derive_seed
from ktl.simulate import build_clients, evaluate_clients

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


def run_demo(options: DemoOptions) -> dict[str, object]:
    config = build_config(
        preset=options.preset,
        overrides={"num_clients": options.clients, "rounds": options.rounds, "seed": options.seed},
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
    admin_token = secrets.token_urlsafe(24)
    settings = ServerSettings(
        data_dir=out / "server", host=host, port=port, admin_token=admin_token, device=config.device
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
    fed = admin.create_federation(
        {
            "name": "demo",
            "num_classes": data.num_classes,
            "class_names": data.class_names,
            "quorum": len(data.clients),
            "round_deadline_s": 600,
            "fedktl": config.fedktl.model_dump(),
            "aligner": config.aligner.model_dump(),
            "seed": config.seed,
            "etf_seed": config.etf_seed,
        }
    )
    fid = fed["id"]
    logger.info(
        "federation %s: %d classes, generator: %s", fid, data.num_classes, fed["generator"]["description"]
    )
    etf = torch.tensor(admin.federation(fid, include_etf=True)["etf"])
    clients = build_clients(config, data, etf, resolve_device(config.device))
    sdks = [KtlHttpClient(url, admin.register_client(fid, c.client_id)["token"]) for c in clients]
    mu = config.fedktl.mu
    dtype = getattr(torch, config.fedktl.upload_dtype)
    history = []
    for r in range(1, options.rounds + 1):
        t0 = time.perf_counter()
        for client, sdk in zip(clients, sdks, strict=True):
            train_and_upload(client, sdk, fid, r, mu=mu, dtype=dtype)
        accuracy, _ = evaluate_clients(clients)
        published = [take_pairs(client, sdk, fid, r) for client, sdk in zip(clients, sdks, strict=True)]
        state = admin.round(fid, r)
        history.append(accuracy)
        logger.info(
            "round %d/%d  accuracy %.4f  (%d uploads, round %s, align %.2fs)  %.1fs",
            r,
            options.rounds,
            accuracy,
            state["uploads"],
            state["state"] if all(published) else "failed",
            (state.get("stats") or {}).get("align_seconds", float("nan")),
            time.perf_counter() - t0,
        )
    grid = out / "server" / "federations" / fid / "rounds" / str(options.rounds) / "pairs.png"
    logger.info("pairs grid: %s", grid.resolve())
    logger.info(
        "pairs grid URL: %s/v1/federations/%s/rounds/%d/pairs.png (bearer token needed)",
        url,
        fid,
        options.rounds,
    )
    logger.info("final accuracy %.4f, best %.4f", history[-1], max(history))
    for sdk in sdks:
        sdk.close()
    admin.close()
    return {"federation": fid, "accuracy": history, "grid": str(grid), "url": url}
