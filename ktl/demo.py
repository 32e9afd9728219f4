"""``ktl demo``: the whole system on one machine — a ktl server on 127.0.0.1 (a free port) and N
heterogeneous clients that train on Fashion-MNIST partitions and talk to it through the SDK over real
HTTP, round after round, with any method that exchanges payloads (``--method``).

The federation is the runner's (`ktl.runner.Runner` over `ktl.participant.HttpTransport`): the clients
are built as ``ktl simulate`` builds them and drive the same steps, so with the same seed, clients and
rounds the demo reproduces ``ktl simulate``'s per-round accuracies, and its run folder holds the same files
(the server's data folder beside them, in ``server/``).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktl.api import ServerSettings, create_app
from ktl.api.process import ServerThread, free_port
from ktl.api.service import KtlService
from ktl.clients.sdk import KtlHttpClient
from ktl.config import build_config
from ktl.data import build_federated_data
from ktl.device import resolve_device
from ktl.errors import ConfigError, DataError, KtlError
from ktl.methods import get_method
from ktl.participant import HttpTransport
from ktl.runner import Runner, prepare_run_dir

__all__ = ["DemoOptions", "SERVER_FOLDER", "run_demo"]

logger = logging.getLogger(__name__)

SERVER_FOLDER = "server"
"""The run folder's sub-folder that holds the demo server's own data folder."""


@dataclass(frozen=True)
class DemoOptions:
    rounds: int = 5  # communication rounds
    clients: int = 20  # heterogeneous clients (the cpu-small zoo, round-robin)
    seed: int = 0
    preset: str = "cpu-small"  # data, models and local training of this preset
    out: Path | None = None  # run folder; default runs/demo-<time>
    keep_serving: bool = False  # leave the server up (Ctrl-C to stop) for a look at the console and the grids
    method: str = "fedktl"  # any registered method that exchanges payloads
    overrides: dict[str, Any] = field(default_factory=dict)  # settings, as `ktl simulate` takes them


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """The federation of ``options`` through a ktl server on loopback: `ktl.runner.Runner` over an
    `HttpTransport`. The run folder is ``ktl simulate``'s (docs/run-folder.md), with the server's own data
    folder in its ``server/`` sub-folder."""
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

    if options.out is not None:
        config = config.model_copy(update={"out": options.out})
    out = prepare_run_dir(config, prefix="demo-")
    host, port = "127.0.0.1", free_port()
    admin_token = "ktl_" + secrets.token_urlsafe(24)  # never starts with "-" (see add_client)
    settings = ServerSettings(
        data_dir=out / SERVER_FOLDER,
        host=host,
        port=port,
        admin_token=admin_token,
        device=config.device,
        generators={"default": config.generator},
    )
    api = create_app(settings)
    service: KtlService = api.state.service
    server = ServerThread(api, host, port).start()
    logger.info(
        "ktl server on %s (OpenAPI schema: %s/openapi.json), state in %s",
        server.url,
        server.url,
        settings.data_dir,
    )
    transport = HttpTransport(
        server.url,
        admin_token,
        data,
        resolve_device(config.device),
        spec={"name": "demo", "quorum": len(data.clients), "round_deadline_s": 600},
        round_dir=service.store.round_dir,
        server_method=service.rounds.warm_method,
    )
    try:
        summary = Runner(config, transport, run_dir=out, progress=False, log=logger).run()
        return {**summary, **_report(transport, options.rounds, out)}
    finally:
        if options.keep_serving:
            logger.info("serving on %s until Ctrl-C (admin token: %s)", server.url, admin_token)
            try:
                while server.thread.is_alive():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        server.stop()


def _report(transport: HttpTransport, rounds: int, out: Path) -> dict[str, Any]:
    """Where to look (the grid, its URL, the ε spent); a failed round fails the demo."""
    url, fid = transport.url, transport.fid
    grid = out / "pairs.png"
    if grid.is_file():
        logger.info("pairs grid: %s", grid.resolve())
        logger.info(
            "pairs grid URL: %s/v1/federations/%s/rounds/%d/pairs.png (bearer token needed)", url, fid, rounds
        )
    logger.info("broadcast: %s/v1/federations/%s/rounds/%d/broadcast", url, fid, rounds)
    with KtlHttpClient(url, transport.admin_token) as admin:
        final = admin.federation(fid)
    if final["privacy"]:
        logger.info(
            "privacy: ε spent %.3f of %.3f", final["privacy"]["epsilon_spent"], final["privacy"]["epsilon"]
        )
    if transport.failed:  # the main job did not do its job: say so, and exit non-zero
        raise KtlError(
            f"{len(transport.failed)} of {rounds} rounds failed on the server ({transport.failed[0]})"
        )
    return {
        "federation": fid,
        "grid": str(grid) if grid.is_file() else None,
        "url": url,
        "privacy": final["privacy"],
    }
