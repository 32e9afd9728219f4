"""ktl's ClientApp: client *i* (the node's ``partition-id``) built exactly as ``ktl simulate`` builds it,
running its method's client step. Flower keeps nothing of a ClientApp between rounds, so the client's
state (weights, BatchNorm statistics, RNG states, held pairs, the method's client state) lives in the node's
``context.state`` as an ``ArrayRecord``. A secure-aggregation method's round arrives as SecAgg+'s training
stage (``FitIns``) and is answered as ``FitRes``, masked by ``secaggplus_mod`` (`ktl.flower.secagg`)."""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import LOGGER_NAME

from ktl.clients import LocalClient, simplex_etf
from ktl.config import SimulateConfig
from ktl.data import DataConfig, FederatedData, build_federated_data
from ktl.device import resolve_device
from ktl.flower.config import from_run_config
from ktl.flower.records import from_record, from_tensors, to_record, to_tensors
from ktl.flower.secagg import fit_res, is_secure_message, read_fit_ins, secure_sum_mod
from ktl.methods import Method, MethodContext, get_method
from ktl.seeding import derive_seed
from ktl.simulate import build_client, method_settings
from ktl.study import miss_reason

__all__ = ["app", "make_client_app"]

# Through Flower's logger ("flwr"): the app's lines appear where Flower prints, in a SuperLink's or
# SuperNode's log as in a simulation.
logger = logging.getLogger(f"{LOGGER_NAME}.{__name__}")

_STATE = "ktl-client"
_METHOD_PREFIX = "method."


@lru_cache(maxsize=4)
def _data(data_json: str, num_clients: int, seed: int) -> FederatedData:
    """The federated data, built once per process (deterministic in its config: a cache, not state)."""
    return build_federated_data(DataConfig.model_validate_json(data_json), num_clients=num_clients, seed=seed)


def _save_state(context: Context, client: LocalClient, method: Method) -> None:
    """The client's state (and its method's) into the node's ``context.state`` for the next round."""
    state = client.state_tensors()
    state.update({_METHOD_PREFIX + k: v for k, v in method.client_state(client).items()})
    context.state[_STATE] = from_tensors(state)


def train_step(config: SimulateConfig, message: Message, context: Context) -> Message:
    """One round of client ``partition-id``: take the last broadcast, train, upload, evaluate."""
    t0 = time.perf_counter()
    index = int(cast(int, context.node_config["partition-id"]))
    data = _data(config.data.model_dump_json(), config.num_clients, config.seed)
    device = resolve_device(config.device)
    etf = simplex_etf(data.num_classes, data.num_classes, seed=config.etf_seed)
    client = build_client(config, data, index, etf, device)
    cls = get_method(config.method)
    ctx = MethodContext(
        num_classes=data.num_classes,
        proto_dim=data.num_classes,
        class_names=data.class_names,
        device=device,
        seed=config.seed,
    )
    method = cls(method_settings(config), ctx)
    if _STATE in context.state.array_records:
        saved = to_tensors(context.state.array_records[_STATE])
        client.load_state_tensors({k: v for k, v in saved.items() if not k.startswith(_METHOD_PREFIX)})
        method.load_client_state(
            client,
            {k.removeprefix(_METHOD_PREFIX): v for k, v in saved.items() if k.startswith(_METHOD_PREFIX)},
        )
    content = message.content
    secure = is_secure_message(content)
    evaluate = True
    if secure:
        round_index, broadcast = read_fit_ins(content)
    else:
        round_config = content.config_records["config"]
        round_index = cast(int, round_config["round"])
        evaluate = bool(round_config.get("evaluate", True))
        broadcast = (
            from_record(content.array_records["broadcast"]) if "broadcast" in content.array_records else None
        )
    if broadcast is not None:
        method.client_receive(client, broadcast)
    # study.dropout / study.round_budget: a client that misses the round keeps the broadcast but neither
    # trains nor uploads (under SecAgg+ every sampled client takes part: its protocol handles dropouts).
    missed = None
    if not secure:
        missed = miss_reason(
            config.study,
            config.seed,
            round_index,
            index,
            num_train=client.num_train,
            epochs=config.client.epochs,
        )
    if missed is not None:
        _save_state(context, client, method)
        reply = RecordDict(
            {
                "meta": ConfigRecord(
                    {"client-id": client.client_id, "partition-id": index, "missed": missed}
                ),
                "metrics": MetricRecord({"missed": 1, "seconds": time.perf_counter() - t0}),
            }
        )
        return Message(reply, reply_to=message)
    client.start_round(round_index, config.rounds)
    update = method.client_update(client, round_index)
    correct, total = client.evaluate() if evaluate else (0, 0)
    _save_state(context, client, method)
    metrics = {
        "correct": correct,
        "total": total,
        "train-loss": update.stats.supervised_loss,
        "distill-loss": update.stats.distill_loss,
        "skipped-steps": update.stats.skipped,
        "seconds": time.perf_counter() - t0,
    }
    if secure:
        if update.payload is None or method.aggregation != "sum":
            raise ValueError(f"method {config.method!r} has no summand for secure aggregation")
        # SecAgg+'s stochastic rounding draws from numpy's global RNG: seeded per client and round, a run
        # repeats exactly.
        np.random.seed(derive_seed(config.seed, "secagg-rounding", index, round_index) % 2**32)
        return Message(fit_res(update.payload, method.summand_layout(), metrics), reply_to=message)
    reply = RecordDict(
        {
            "meta": ConfigRecord({"client-id": client.client_id, "partition-id": index}),
            "metrics": MetricRecord(metrics),
        }
    )
    if update.payload is not None:
        reply["payload"] = to_record(update.payload)
    return Message(reply, reply_to=message)


def make_client_app(config: SimulateConfig | None = None) -> ClientApp:
    """The ClientApp; with ``config`` its settings are fixed (``ktl flower simulate``), else they come from
    the run config (``flwr run``)."""
    app = ClientApp(mods=[secure_sum_mod])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        resolved = config if config is not None else from_run_config(context.run_config)[0]
        return train_step(resolved, message, context)

    return app


app = make_client_app()
