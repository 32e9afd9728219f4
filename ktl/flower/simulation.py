"""``ktl flower simulate``: the Flower app on Flower's Simulation Engine (Ray), from Python or the CLI,
with the same configuration as ``ktl simulate`` (a preset, a config file, ``--x.y`` flags)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.common.logger import LOGGER_NAME

from ktl.config import SimulateConfig
from ktl.flower.client_app import make_client_app
from ktl.flower.config import FlowerOptions
from ktl.flower.server_app import make_server_app

__all__ = ["run_flower_simulation"]

# Through Flower's logger ("flwr"): the app's lines appear where Flower prints, in a SuperLink's or
# SuperNode's log as in a simulation.
logger = logging.getLogger(f"{LOGGER_NAME}.{__name__}")


def run_flower_simulation(
    config: SimulateConfig,
    options: FlowerOptions | None = None,
    *,
    cpus_per_client: float = 1.0,
    gpus_per_client: float | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """``config.num_clients`` virtual SuperNodes (partition ids 0 … N−1) on the Simulation Engine; returns
    the ServerApp's summary. ``gpus_per_client`` defaults to 1/N of a GPU when CUDA is present, else 0."""
    from flwr.simulation import run_simulation

    if gpus_per_client is None:
        gpus_per_client = 1.0 / config.num_clients if torch.cuda.is_available() else 0.0
    result: dict[str, Any] = {}
    run_simulation(
        server_app=make_server_app(config, options, result),
        client_app=make_client_app(config),
        num_supernodes=config.num_clients,
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client}},
        verbose_logging=verbose,
    )
    if not result:
        raise RuntimeError("the Flower simulation ended without a result (see Flower's log above)")
    return result
