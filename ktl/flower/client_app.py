"""ktl's ClientApp: client *i* (the node's ``partition-id``) built exactly as ``ktl simulate`` builds it,
running the runner's client step (`ktl.runner.client_step`).

The client (data, model, optimiser, the method's client state) is kept in this process across the rounds
of a run, keyed by run id and partition (`client_for`); after every step its state also goes into the
node's ``context.state`` (an ``ArrayRecord`` with a step counter), and a process that does not hold the
client at that step — a fresh one, or one that another worker overtook — restores it from there. Messages:
``query`` (who the client is: partition, client id, the classes; the ServerApp builds no data set),
``train`` (take the last broadcast, train or miss the round, upload, evaluate when asked), ``evaluate``
(take the last broadcast, score). A secure-aggregation method's round arrives as SecAgg+'s training stage
(``FitIns``) and is answered as ``FitRes``, masked by ``secaggplus_mod`` (`ktl.flower.secagg`)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

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
from ktl.methods import Method
from ktl.runner import RoundPlan, build_client, build_method, client_step
from ktl.seeding import derive_seed

__all__ = ["app", "client_data", "client_for", "make_client_app"]

# Through Flower's logger ("flwr"): the app's lines appear where Flower prints, in a SuperLink's or
# SuperNode's log as in a simulation.
logger = logging.getLogger(f"{LOGGER_NAME}.{__name__}")

_STATE = "ktl-client"
_STEP = "ktl-step"  # context.state's ConfigRecord: how many steps the saved state has seen
_METHOD_PREFIX = "method."
_HELD_MAX = 64  # clients kept in one process (LRU): a Ray worker may serve many partitions


@dataclass
class Held:
    """A client kept in memory between rounds, with its method's client side and its step count."""

    client: LocalClient
    method: Method
    index: int
    source: str
    class_names: list[str]
    step: int = 0


_HELD: OrderedDict[tuple[int, int], Held] = OrderedDict()


@lru_cache(maxsize=4)
def _data(data_json: str, num_clients: int, seed: int) -> FederatedData:
    """The federated data, built once per process (deterministic in its config: a cache, not state)."""
    return build_federated_data(DataConfig.model_validate_json(data_json), num_clients=num_clients, seed=seed)


def client_data(config: SimulateConfig, context: Context) -> tuple[FederatedData, int]:
    """This node's data and its client index: partition ``partition-id`` of the preset's data."""
    index = int(cast(int, context.node_config["partition-id"]))
    return _data(config.data.model_dump_json(), config.num_clients, config.seed), index


def _saved_step(context: Context) -> int:
    record = context.state.config_records.get(_STEP)
    return int(cast(int, record["step"])) if record is not None else 0


def client_for(config: SimulateConfig, context: Context) -> Held:
    """This node's client for this run: the one held in memory when it is at the step ``context.state``
    saw last, else built and restored from ``context.state``."""
    index = int(cast(int, context.node_config["partition-id"]))
    key = (int(context.run_id), index)
    step = _saved_step(context)
    held = _HELD.get(key)
    if held is not None and held.step == step:
        _HELD.move_to_end(key)
        return held
    data, index = client_data(config, context)
    device = resolve_device(config.device)
    etf = simplex_etf(data.num_classes, data.num_classes, seed=config.etf_seed)
    client = build_client(config, data, index, etf, device)
    method = build_method(config, data.num_classes, data.class_names, device, server=False)
    if _STATE in context.state.array_records:
        saved = to_tensors(context.state.array_records[_STATE])
        client.load_state_tensors({k: v for k, v in saved.items() if not k.startswith(_METHOD_PREFIX)})
        method.load_client_state(
            client,
            {k.removeprefix(_METHOD_PREFIX): v for k, v in saved.items() if k.startswith(_METHOD_PREFIX)},
        )
    held = Held(client, method, index, data.source, list(data.class_names), step)
    _HELD[key] = held
    while len(_HELD) > _HELD_MAX:
        _HELD.popitem(last=False)
    return held


def _save_state(context: Context, held: Held) -> None:
    """The client's state (and its method's) into the node's ``context.state``, one step further."""
    state = held.client.state_tensors()
    state.update({_METHOD_PREFIX + k: v for k, v in held.method.client_state(held.client).items()})
    held.step += 1
    context.state[_STATE] = from_tensors(state)
    context.state[_STEP] = ConfigRecord({"step": held.step})


def _receive(held: Held, content: RecordDict) -> None:
    if "broadcast" in content.array_records:
        held.method.client_receive(held.client, from_record(content.array_records["broadcast"]))


def _meta(held: Held, **extra: Any) -> ConfigRecord:
    return ConfigRecord({"client-id": held.client.client_id, "partition-id": held.index, **extra})


def query_step(config: SimulateConfig, message: Message, context: Context) -> Message:
    """Who this client is: its partition and client id, the classes and the data's source."""
    held = client_for(config, context)
    meta = _meta(held, **{"class-names": held.class_names, "source": held.source})
    return Message(RecordDict({"meta": meta}), reply_to=message)


def evaluate_step(config: SimulateConfig, message: Message, context: Context) -> Message:
    """Take the last broadcast and score the client on its test split."""
    held = client_for(config, context)
    _receive(held, message.content)
    correct, total = held.client.evaluate()
    _save_state(context, held)
    reply = RecordDict({"meta": _meta(held), "metrics": MetricRecord({"correct": correct, "total": total})})
    return Message(reply, reply_to=message)


def train_step(config: SimulateConfig, message: Message, context: Context) -> Message:
    """One round of this client: take the last broadcast, the runner's client step, upload, evaluate."""
    t0 = time.perf_counter()
    held = client_for(config, context)
    content = message.content
    secure = is_secure_message(content)
    if secure:
        round_index, broadcast = read_fit_ins(content)
        rounds, evaluate = config.rounds, True
        if broadcast is not None:
            held.method.client_receive(held.client, broadcast)
    else:
        round_config = content.config_records["config"]
        round_index = int(cast(int, round_config["round"]))
        rounds = int(cast(int, round_config.get("rounds", config.rounds)))
        evaluate = bool(round_config.get("evaluate", True))
        _receive(held, content)
    plan = RoundPlan(round_index, rounds, [held.index], evaluate)
    if secure:  # under SecAgg+ every sampled client takes part: its protocol handles dropouts
        config = config.model_copy(
            update={"study": config.study.model_copy(update={"dropout": 0.0, "round_budget": None})}
        )
    reply = client_step(held.method, held.client, held.index, plan, config)
    correct, total = held.client.evaluate() if evaluate else (0, 0)
    _save_state(context, held)
    metrics: dict[str, Any] = {"seconds": time.perf_counter() - t0}
    if evaluate:
        metrics.update(correct=correct, total=total)
    if reply.stats is not None:
        metrics.update(
            {
                "steps": reply.stats.steps,
                "train-loss": reply.stats.supervised_loss,
                "distill-loss": reply.stats.distill_loss,
                "skipped-steps": reply.stats.skipped,
            }
        )
    if secure:
        if reply.payload is None or held.method.aggregation != "sum":
            raise ValueError(f"method {config.method!r} has no summand for secure aggregation")
        # SecAgg+'s stochastic rounding draws from numpy's global RNG: seeded per client and round, a run
        # repeats exactly.
        np.random.seed(derive_seed(config.seed, "secagg-rounding", held.index, round_index) % 2**32)
        metrics["partition-index"] = held.index
        return Message(fit_res(reply.payload, held.method.summand_layout(), metrics), reply_to=message)
    extra = {"missed": reply.missed} if reply.missed is not None else {}
    out = RecordDict({"meta": _meta(held, **extra), "metrics": MetricRecord(metrics)})
    if reply.payload is not None:
        out["payload"] = to_record(reply.payload)
    return Message(out, reply_to=message)


def make_client_app(config: SimulateConfig | None = None) -> ClientApp:
    """The ClientApp; with ``config`` its settings are fixed (``ktl flower simulate``), else they come from
    the run config (``flwr run``)."""
    app = ClientApp(mods=[secure_sum_mod])

    def resolved(context: Context) -> SimulateConfig:
        return config if config is not None else from_run_config(context.run_config)[0]

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return query_step(resolved(context), message, context)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return train_step(resolved(context), message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return evaluate_step(resolved(context), message, context)

    return app


app = make_client_app()
