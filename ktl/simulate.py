"""``ktl simulate``: N heterogeneous clients × R rounds of a registered method, in one process.

The loop, top to bottom: build data (partitioned, split per client) → build the client zoo against one
shared ETF → for each round: the round's participants (``study``: join ratio, dropout, stragglers) train
at the round's learning rate and upload → on evaluated rounds accuracy is measured over every client
(test-sample-weighted, as PFLlib reports) → the server turns uploads into one broadcast → every client
takes it → an early stop may end the run. A run folder receives the resolved config, one metrics line
per round, the method's artifacts, each client's weights (``clients/<client id>.safetensors``) and
``summary.json``; ``study.repeats`` runs several seeds into sub-folders (`run_repeats`).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import ktl
from ktl.clients import ClientModel, LocalClient, simplex_etf
from ktl.clients.trainer import scheduled_lr
from ktl.config import SimulateConfig
from ktl.data import FederatedData, build_federated_data
from ktl.device import resolve_device
from ktl.errors import ConfigError
from ktl.generator import load_generator
from ktl.methods import Method, MethodContext, MethodSettings, get_method
from ktl.seeding import derive_seed
from ktl.study import (
    CLIENT_WEIGHTS,
    Plateau,
    is_evaluated,
    load_client_weights,
    mean_std,
    miss_reason,
    participants,
    save_client_weights,
)

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


def prepare_run_dir(config: SimulateConfig, *, overwrite: bool = False) -> Path:
    """Create the run folder; refuse to write into a non-empty one unless ``overwrite``."""
    if config.out is not None:
        run_dir = Path(config.out)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{config.method}-{config.preset or 'custom'}-s{config.seed}-{stamp}"
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"run folder {run_dir} already exists and is not empty; choose another --out or pass --overwrite"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def build_client(
    config: SimulateConfig, data: FederatedData, index: int, etf: torch.Tensor, device: torch.device
) -> LocalClient:
    """Client ``index``: model ``config.models[index % len]``, initialised from its own derived seed (the
    global RNG is left as it was), on data split ``index``. The same in ``simulate``, ``demo`` and
    ``ktl client run``. With ``study.pretrained`` it starts from the weights an earlier run saved for it."""
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


def method_settings(config: SimulateConfig) -> MethodSettings:
    """The sections of ``config`` that its method reads; a privacy budget without ``privacy.rounds``
    covers the run's rounds. A DP setting the method cannot apply is refused, never ignored."""
    cls = get_method(config.method)
    if config.privacy.epsilon is not None and "privacy" not in cls.settings_model.sections():
        raise ConfigError(f"privacy.epsilon is not available for method {config.method!r}")
    if config.privacy.rounds is None:
        config = config.model_copy(
            update={"privacy": config.privacy.model_copy(update={"rounds": config.rounds})}
        )
    return cls.settings_from(config)


def build_method(
    config: SimulateConfig, num_classes: int, class_names: list[str], device: torch.device
) -> Method:
    """``config.method`` with its own settings; the generator is loaded only for methods that use one."""
    cls = get_method(config.method)
    generator = load_generator(config.generator, device) if cls.uses_generator else None
    ctx = MethodContext(
        num_classes=num_classes,
        proto_dim=num_classes,  # K = C
        class_names=class_names,
        device=device,
        seed=config.seed,
        generator=generator,
    )
    return cls(method_settings(config), ctx)


def evaluate_clients(clients: list[LocalClient]) -> tuple[float, list[float | None]]:
    """Test-sample-weighted mean accuracy over clients (PFLlib's figure) and each client's accuracy."""
    scores = [client.evaluate() for client in clients]
    accuracy = sum(c for c, _ in scores) / max(1, sum(t for _, t in scores))
    return accuracy, [c / t if t else None for c, t in scores]


def run_simulation(
    config: SimulateConfig, *, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run ``config`` end to end; returns the summary (also written to ``summary.json``)."""
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(derive_seed(config.seed, "global"))
    data = build_federated_data(config.data, num_clients=config.num_clients, seed=config.seed)
    num_classes = data.num_classes
    etf = simplex_etf(num_classes, num_classes, seed=config.etf_seed)  # K = C
    clients = build_clients(config, data, etf, device)
    method = build_method(config, num_classes, data.class_names, device)
    run_dir = prepare_run_dir(config, overwrite=overwrite)
    resolved = config.model_copy(update={"out": run_dir})
    (run_dir / "config.json").write_text(resolved.model_dump_json(indent=2) + "\n")
    logger.info(
        "%s on %s: %d clients (%s), %d rounds, device %s → %s",
        config.method,
        data.source,
        len(clients),
        ", ".join(config.models),
        config.rounds,
        device,
        run_dir,
    )
    for key, value in method.describe().items():
        logger.info("%s: %s", key, value)

    study = config.study
    accuracies: dict[int, float] = {}  # evaluated round → accuracy
    plateau = Plateau(study.patience, study.min_delta)
    stopped: dict[str, Any] | None = None
    rounds_run = 0
    bytes_up = bytes_down = 0
    published: dict[str, bytes] = {}  # the last broadcast and the files the method publishes beside it
    bar = tqdm(total=config.rounds * len(clients), desc=config.method, unit="client", disable=not progress)
    with (run_dir / "metrics.jsonl").open("w") as metrics_file:
        for round_index in range(1, config.rounds + 1):
            t_round = time.perf_counter()
            uploads: dict[str, bytes] = {}
            stats = []
            chosen = participants(study, config.seed, round_index, len(clients))
            missed: dict[str, str] = {}  # chosen clients that did not report: id → dropout | straggler
            lr = scheduled_lr(config.client, round_index, config.rounds)
            for index in chosen:
                client = clients[index]
                reason = miss_reason(
                    study,
                    config.seed,
                    round_index,
                    index,
                    num_train=client.num_train,
                    epochs=config.client.epochs,
                )
                if reason is not None:
                    missed[client.client_id] = reason
                    continue
                client.start_round(round_index, config.rounds)
                update = method.client_update(client, round_index)
                stats.append(update.stats)
                if update.payload is not None:
                    uploads[client.client_id] = update.payload
            bar.update(len(clients))
            t_trained = time.perf_counter()
            evaluated = is_evaluated(study, round_index, config.rounds)
            accuracy: float | None = None
            client_accuracy: list[float | None] | None = None
            if evaluated:
                accuracy, client_accuracy = evaluate_clients(clients)
                accuracies[round_index] = accuracy
            # The server step's input: the uploads, or for a "sum" method their sum alone.
            server_input = method.server_input(uploads) if uploads else {}
            server = method.server_update(server_input, round_index) if server_input else None
            if server is not None:
                method.save_round(run_dir, round_index, server_input)
                published = dict(server.files)
                if server.payload is not None:
                    published[method.broadcast_file] = server.payload
                    for client in clients:  # participants or not
                        method.client_receive(client, server.payload)
            round_up = sum(len(p) for p in uploads.values())
            broadcast = server.payload if server is not None else None
            round_down = len(broadcast) * len(clients) if broadcast is not None else 0
            bytes_up += round_up
            bytes_down += round_down
            record = {
                "round": round_index,
                "accuracy": accuracy,
                "client_accuracy": client_accuracy,
                "evaluated": evaluated,
                "lr": lr,
                "participants": chosen,
                "trained": len(stats),
                "missed": missed,
                "train_loss": sum(s.supervised_loss for s in stats) / len(stats) if stats else None,
                "distill_loss": sum(s.distill_loss for s in stats) / len(stats) if stats else None,
                "skipped_steps": sum(s.skipped for s in stats),
                "bytes_up": round_up,
                "bytes_down": round_down,
                "train_seconds": t_trained - t_round,
                "round_seconds": time.perf_counter() - t_round,
                **(server.metrics if server is not None else {}),
            }
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            rounds_run = round_index
            if accuracy is not None:
                bar.set_postfix(round=round_index, acc=f"{accuracy:.4f}")
                logger.info(
                    "round %d/%d  accuracy %.4f  (best %.4f)  %.1fs",
                    round_index,
                    config.rounds,
                    accuracy,
                    max(accuracies.values()),
                    record["round_seconds"],
                )
                if plateau.update(accuracy):
                    stopped = {"round": round_index, "reason": plateau.reason()}
                    logger.info("early stop after round %d: %s", round_index, stopped["reason"])
                    break
            else:
                logger.info(
                    "round %d/%d  not evaluated  %.1fs", round_index, config.rounds, record["round_seconds"]
                )
    bar.close()

    for name, content in published.items():
        (run_dir / name).write_bytes(content)
    artifacts = {name: name for name in published}
    artifacts.update(method.save_artifacts(run_dir))
    save_client_weights(clients, run_dir)
    artifacts[CLIENT_WEIGHTS] = f"{CLIENT_WEIGHTS}/"
    n_transfers = len(clients) * rounds_run
    best_round = max(accuracies, key=lambda r: (accuracies[r], -r))
    summary: dict[str, Any] = {
        "method": config.method,
        "preset": config.preset,
        "seed": config.seed,
        "rounds": config.rounds,
        "rounds_run": rounds_run,
        "stopped_early": stopped,
        "num_clients": len(clients),
        "models": config.models,
        "data": data.source,
        "class_names": data.class_names,
        "final_accuracy": accuracies[max(accuracies)],
        "best_accuracy": accuracies[best_round],
        "best_round": best_round,
        "bytes_up_per_client_round": bytes_up / n_transfers,
        "bytes_down_per_client_round": bytes_down / n_transfers,
        "wall_time_s": time.perf_counter() - t_start,
        "device": str(device),
        **method.describe(),
        "artifacts": artifacts,
        "versions": {"ktl": ktl.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(
        "final accuracy %.4f, best %.4f (round %d); run folder: %s",
        summary["final_accuracy"],
        summary["best_accuracy"],
        summary["best_round"],
        run_dir,
    )
    return summary


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
