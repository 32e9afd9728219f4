"""Secure aggregation on Flower: a round of a ``"sum"`` method (`ktl.methods.secure`) through Flower's SecAgg+.

Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the client) runs four
exchanges per round — key set-up, key shares, masked vectors, unmasking — and hands the server only the
(weighted) average of the clients' arrays; each reply of the masked-vector stage carries the client's
quantised summand plus pairwise masks (agreed with its neighbours by Diffie–Hellman) and a private mask
(secret-shared), so the server cannot unmask one reply, and the plaintext arrays are cleared from the reply
before it leaves the client. The workflow is written for Flower's legacy ``Strategy`` API; this module is
the small adapter between it and ktl's round:

- server: `secure_sum_round` gives the workflow a ``LegacyContext`` whose strategy sends the round's
  broadcast to the sampled nodes as ``FitIns`` and keeps what ``aggregate_fit`` receives — the average of
  the summands (every client weighs 1), times the number of clients: their sum, the server step's only
  input;
- client: ``ktl.flower.client_app.secure_sum_mod`` passes SecAgg+ messages to ``secaggplus_mod`` (and
  every other message straight on); `read_fit_ins` / `fit_res` turn ``FitIns``/``FitRes`` records into ktl's broadcast bytes
  and back.

Parameters (the ``flower.secagg-*`` run-config keys): shares and reconstruction threshold as Flower's; the
clipping range is 1 (summands lie in [−1, 1]), 2²² quantisation levels, modulus 2³², weights 1.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import LOGGER_NAME
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.serverapp import Grid
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = [
    "SecureRound",
    "fit_res",
    "is_secure_message",
    "read_fit_ins",
    "secure_sum_round",
]

# Through Flower's logger ("flwr"): the app's lines appear where Flower prints, in a SuperLink's or
# SuperNode's log as in a simulation.
logger = logging.getLogger(f"{LOGGER_NAME}.{__name__}")

_FIT_INS_CONFIG = "fitins.config"
_NAMES = "broadcast-names"
# Summands lie in [−1, 1] (`ktl.methods.secure`); every client weighs 1, so SecAgg+'s weighting is exact.
_CLIPPING_RANGE = 1.0
_MAX_WEIGHT = 1.0


@dataclass
class SecureRound:
    """What one secure round gave the server: the sum of the summands (safetensors bytes, None when the
    protocol halted), each replying client's metrics, and the sampled nodes that failed."""

    total: bytes | None = None
    metrics: list[dict[str, Scalar]] = field(default_factory=list)
    failures: int = 0


class _RoundStrategy(Strategy):
    """The legacy strategy SecAgg+ drives for one round: send ``fit_ins`` to the given nodes, keep the
    aggregate. Evaluation is not part of a ktl round (clients report their accuracy in the metrics)."""

    def __init__(self, proxies: list[ClientProxy], fit_ins: FitIns) -> None:
        self.proxies, self.fit_ins = proxies, fit_ins
        self.average: list[np.ndarray] | None = None
        self.metrics: list[dict[str, Scalar]] = []
        self.failures = 0

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, self.fit_ins) for proxy in self.proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.failures = len(failures)
        if results:
            # SecAgg+ set every result's parameters to the one unmasked aggregate.
            self.average = parameters_to_ndarrays(results[0][1].parameters)
            self.metrics = [dict(res.metrics) for _, res in results]
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


def _fit_ins(round_index: int, broadcast: bytes | None) -> FitIns:
    tensors = st_load(broadcast) if broadcast is not None else {}
    names = sorted(tensors)
    arrays = [tensors[n].numpy() for n in names]
    return FitIns(ndarrays_to_parameters(arrays), {"round": round_index, _NAMES: json.dumps(names)})


def secure_sum_round(
    grid: Grid,
    context: Context,
    nodes: list[int],
    round_index: int,
    broadcast: bytes | None,
    layout: Mapping[str, tuple[int, ...]],
    *,
    shares: int | float,
    threshold: int | float,
    timeout: float | None,
) -> SecureRound:
    """One round of a ``"sum"`` method on ``nodes`` under SecAgg+; see the module."""
    strategy = _RoundStrategy(
        [GridClientProxy(node, grid, context.run_id) for node in nodes], _fit_ins(round_index, broadcast)
    )
    legacy = LegacyContext(context, strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": round_index})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=shares,
        reconstruction_threshold=threshold,
        max_weight=_MAX_WEIGHT,
        clipping_range=_CLIPPING_RANGE,
        timeout=timeout,
    )
    workflow(grid, legacy)
    out = SecureRound(metrics=strategy.metrics, failures=len(nodes) - len(strategy.metrics))
    if strategy.average is not None and strategy.metrics:
        n = len(strategy.metrics)
        arrays = strategy.average
        if len(arrays) != len(layout):
            raise RuntimeError(f"SecAgg+ returned {len(arrays)} arrays for a summand of {len(layout)}")
        out.total = st_save(
            {
                name: torch.from_numpy(np.asarray(a, dtype=np.float64).reshape(shape) * n)
                for (name, shape), a in zip(layout.items(), arrays, strict=True)
            }
        )
    return out


# -- client side -------------------------------------------------------------------------------------------


def is_secure_message(content: RecordDict) -> bool:
    """True for the SecAgg+ stage that trains (its content is ``FitIns``)."""
    return _FIT_INS_CONFIG in content.config_records


def read_fit_ins(content: RecordDict) -> tuple[int, bytes | None]:
    """The round number and the broadcast bytes (None in round 1) from a SecAgg+ training message."""
    ins = compat.recorddict_to_fitins(content, keep_input=True)
    names = json.loads(str(ins.config[_NAMES]))
    arrays = parameters_to_ndarrays(ins.parameters)
    round_index = int(cast(int, ins.config["round"]))
    if not names:
        return round_index, None
    return round_index, st_save(
        {n: torch.from_numpy(np.array(a)) for n, a in zip(names, arrays, strict=True)}
    )


def fit_res(summand: bytes, layout: Mapping[str, tuple[int, ...]], metrics: Mapping[str, Any]) -> RecordDict:
    """The client's reply to the training stage: its summand as ``FitRes`` parameters (``secaggplus_mod``
    masks them and clears the plaintext), weight 1, and its metrics."""
    tensors = st_load(summand)
    arrays = [tensors[name].double().numpy() for name in layout]
    res = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(arrays),
        num_examples=1,
        metrics=dict(metrics),
    )
    return compat.fitres_to_recorddict(res, keep_input=True)
