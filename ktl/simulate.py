"""``ktl simulate``: N heterogeneous clients × R rounds of a registered method, in one process.

The federation is `ktl.runner.Runner`'s — the one round every transport runs — over `LocalTransport`:
every client in this process, the broadcast's bytes handed to each. A run folder receives the resolved
config, one metrics line per round, the method's artifacts, each client's weights
(``clients/<client id>.safetensors``) and ``summary.json`` (docs/run-folder.md); ``study.repeats`` runs
several seeds into sub-folders (`run_repeats`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ktl.config import SimulateConfig
from ktl.device import resolve_device
from ktl.runner import (
    LocalTransport,
    Runner,
    build_client,
    build_clients,
    build_method,
    evaluate_clients,
    method_settings,
    prepare_run_dir,
)
from ktl.study import mean_std

__all__ = [
    "run_repeats",
    "run_simulation",
    "build_client",
    "build_clients",
    "build_method",
    "method_settings",
    "prepare_run_dir",
    "evaluate_clients",
]

logger = logging.getLogger(__name__)


def run_simulation(
    config: SimulateConfig, *, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run ``config`` end to end in this process; returns the summary (also written to ``summary.json``)."""
    transport = LocalTransport(config, resolve_device(config.device))
    return Runner(config, transport, overwrite=overwrite, progress=progress, log=logger).run()


def run_repeats(config: SimulateConfig, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """``config`` with seeds ``seed … seed + study.repeats − 1``, each run in the sub-folder
    ``seed-<seed>`` of the run folder; returns (and writes to the run folder's ``summary.json``) the mean ±
    std of final and best accuracy. With one repeat this is `run_simulation` itself."""
    repeats = config.study.repeats
    if repeats == 1:
        return run_simulation(config, overwrite=overwrite, progress=progress)
    top = prepare_run_dir(config, overwrite=overwrite)
    once = config.study.model_copy(update={"repeats": 1})
    runs: list[dict[str, Any]] = []
    for seed in range(config.seed, config.seed + repeats):
        run_config = config.model_copy(update={"seed": seed, "out": top / f"seed-{seed}", "study": once})
        runs.append(run_simulation(run_config, progress=progress))
    summary: dict[str, Any] = {
        "method": config.method,
        "preset": config.preset,
        "repeats": repeats,
        "seeds": [r["seed"] for r in runs],
        "runs": [f"seed-{r['seed']}" for r in runs],
        "final_accuracy": mean_std([r["final_accuracy"] for r in runs]),
        "best_accuracy": mean_std([r["best_accuracy"] for r in runs]),
    }
    (top / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(
        "%d seeds: final accuracy %.4f ± %.4f, best %.4f ± %.4f; run folder: %s",
        repeats,
        summary["final_accuracy"]["mean"],
        summary["final_accuracy"]["std"],
        summary["best_accuracy"]["mean"],
        summary["best_accuracy"]["std"],
        top,
    )
    return summary
