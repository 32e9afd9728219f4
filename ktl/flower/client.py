"""The client behind ktl's ClientApp (`ktl.flower.client_app`): client *i* (the node's ``partition-id``)
built exactly as ``ktl simulate`` builds it, running the runner's client step (`ktl.runner.client_step`).

The client (data, model, optimiser, the method's client state) is kept in this process across the rounds
of a run, keyed by run id and partition (`client_for`); after every step its state also goes into the
node's ``context.state`` (an ``ArrayRecord`` with a step counter), and a process that does not hold the
client at that step — a fresh one, or one that another worker overtook — restores it from there. Messages:
``query`` (who the client is: partition, client id, the classes; the ServerApp builds no data set),
``train`` (take the last broadcast, train or miss the round, upload, evaluate when asked), ``evaluate``
(take the last broadcast, score). A secure-aggregation method's round arrives as SecAgg+'s training stage
(``FitIns``) and is answered as ``FitRes``, which ``secaggplus_mod`` masks where the ClientApp runs.
Handlers take and give a message's content (`Answer`), so they run in the ClientApp's process or in the
node's worker (`ktl.flower.worker`) alike."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common.logger import LOGGER_NAME

from ktl.clients import LocalClient, simplex_etf
from ktl.config import SimulateConfig
from ktl.data import DataConfig, FederatedData, build_federated_data
from ktl.device import resolve_device
from ktl.flower.client_app import STATE_RECORD, STEP_RECORD
from ktl.flower.records import from_record, from_tensors, to_record, to_tensors
from ktl.flower.secagg import fit_res, is_secure_message, read_fit_ins
from ktl.methods import Method
from ktl.runner import RoundPlan, build_client, build_method, client_step
from ktl.seeding import derive_seed
from ktl.site import node_site_data

__all__ = ["HANDLERS", "Answer", "Held", "client_data", "client_for", "holds", "saved_state"]

# Through Flower's logger ("flwr"): the app's lines appear where Flower prints, in a SuperLink's or
# SuperNode's log as in a simulation.
logger = logging.getLogger(f"{LOGGER_NAME}.{__name__}")

_METHOD_PREFIX = "method."
_HELD_MAX = 64  # clients kept in one process (LRU): a Ray worker may serve many partitions


@dataclass(frozen=True)
class Answer:
    """A handler's reply content, and the seed of numpy's global RNG to set before SecAgg+ masks it."""

    content: RecordDict
    numpy_seed: int | None = None


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
    """This node's data and its client index: partition ``partition-id`` of the preset's data, or, on a
    SuperNode started with ``--node-config "data-dir=DIR"``, the site's own files (`ktl.site`)."""
    index = int(cast(int, context.node_config["partition-id"]))
    site = node_site_data(context.node_config, index)
    if site is not None:
        return site, index
    return _data(config.data.model_dump_json(), config.num_clients, config.seed), index


def _saved_step(context: Context) -> int:
    record = context.state.config_records.get(STEP_RECORD)
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
    if STATE_RECORD in context.state.array_records:
        saved = to_tensors(context.state.array_records[STATE_RECORD])
        client.load_state_tensors({k: v for k, v in saved.items() if not k.startswith(_METHOD_PREFIX)})
        method.load_client_state(
            client,
            {k.removeprefix(_METHOD_PREFIX): v for k, v in saved.items() if k.startswith(_METHOD_PREFIX)},
        )
    logger.info(
        "client %s built for run %d at step %d%s", client.client_id, key[0], step,
        " (restored from context.state)" if STATE_RECORD in context.state.array_records else "",
    )  # fmt: skip
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
    context.state[STATE_RECORD] = from_tensors(state)
    context.state[STEP_RECORD] = ConfigRecord({"step": held.step})


def holds(config: SimulateConfig, context: Context) -> bool:
    """Whether this process holds the node's client at the step ``context.state`` saw last (then
    `client_for` needs nothing from ``context.state`` but the step)."""
    held = _HELD.get((int(context.run_id), int(cast(int, context.node_config["partition-id"]))))
    return held is not None and held.step == _saved_step(context)


def saved_state(context: Context) -> RecordDict:
    """The records this module keeps in ``context.state`` (the rest belongs to others, e.g. SecAgg+)."""
    out = RecordDict()
    for key in (STATE_RECORD, STEP_RECORD):
        if key in context.state:
            out[key] = context.state[key]
    return out


def _receive(held: Held, content: RecordDict) -> None:
    if "broadcast" in content.array_records:
        held.method.client_receive(held.client, from_record(content.array_records["broadcast"]))


def _meta(held: Held, **extra: Any) -> ConfigRecord:
    return ConfigRecord({"client-id": held.client.client_id, "partition-id": held.index, **extra})


def query(config: SimulateConfig, content: RecordDict, context: Context) -> Answer:
    """Who this client is: its partition and client id, the classes and the data's source."""
    held = client_for(config, context)
    meta = _meta(held, **{"class-names": held.class_names, "source": held.source})
    return Answer(RecordDict({"meta": meta}))


def evaluate(config: SimulateConfig, content: RecordDict, context: Context) -> Answer:
    """Take the last broadcast and score the client on its test split."""
    held = client_for(config, context)
    _receive(held, content)
    correct, total = held.client.evaluate()
    _save_state(context, held)
    return Answer(
        RecordDict({"meta": _meta(held), "metrics": MetricRecord({"correct": correct, "total": total})})
    )


def train(config: SimulateConfig, content: RecordDict, context: Context) -> Answer:
    """One round of this client: take the last broadcast, the runner's client step, upload, evaluate."""
    t0 = time.perf_counter()
    held = client_for(config, context)
    secure = is_secure_message(content)
    if secure:
        round_index, broadcast = read_fit_ins(content)
        rounds, evaluate = config.rounds, True
        if broadcast is not None:
            held.method.client_receive(held.client, broadcast)
        # under SecAgg+ every sampled client takes part: its protocol handles dropouts
        study = config.study.model_copy(update={"dropout": 0.0, "round_budget": None})
        config = config.model_copy(update={"study": study})
    else:
        round_config = content.config_records["config"]
        round_index = int(cast(int, round_config["round"]))
        rounds = int(cast(int, round_config.get("rounds", 0))) or config.rounds
        evaluate = bool(round_config.get("evaluate", True))
        _receive(held, content)
    plan = RoundPlan(round_index, rounds, [held.index], evaluate)
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
        metrics["partition-index"] = held.index
        # SecAgg+'s stochastic rounding draws from numpy's global RNG: seeded per client and round where
        # the reply is masked, so a run repeats exactly.
        seed = derive_seed(config.seed, "secagg-rounding", held.index, round_index) % 2**32
        return Answer(fit_res(reply.payload, held.method.summand_layout(), metrics), numpy_seed=seed)
    extra = {"missed": reply.missed} if reply.missed is not None else {}
    out = RecordDict({"meta": _meta(held, **extra), "metrics": MetricRecord(metrics)})
    if reply.payload is not None:
        out["payload"] = to_record(reply.payload)
    return Answer(out)


HANDLERS: dict[str, Callable[[SimulateConfig, RecordDict, Context], Answer]] = {
    "query": query,
    "train": train,
    "evaluate": evaluate,
}
"""The ClientApp's message types → this client's handler."""
