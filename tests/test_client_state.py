"""A client's whole state between rounds: `LocalClient.state_tensors` / `load_state_tensors` and the
method's `Method.client_state` / `load_client_state`.

A transport whose client processes do not live between rounds (Flower's ClientApp keeps only a record of
arrays per node) rebuilds the client with `build_client`, restores the saved tensors, runs one step and
saves again. It must compute exactly what ``ktl simulate`` computes with clients that live on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load, save

from ktl.clients import LocalClient, TrainStats, simplex_etf
from ktl.config import SimulateConfig, build_config
from ktl.data import FederatedData, build_federated_data
from ktl.methods import Method, MethodContext, get_method
from ktl.records import Pairs
from ktl.simulate import build_client, build_method, evaluate_clients, method_settings, run_simulation

DEVICE = torch.device("cpu")
METHODS = ["fedktl", "fedproto", "fedktl-latents"]


def _config(method: str, **overrides: Any) -> SimulateConfig:
    return build_config(
        preset="smoke",
        overrides={
            "num_clients": 2,
            "data": {"fraction": 0.4},  # a quarter of smoke's images per client: seconds, not tens
            "aligner": {"steps": 10},
            "method": method,
            **overrides,
        },
    )


@dataclass
class _Federation:
    config: SimulateConfig
    data: FederatedData
    etf: torch.Tensor

    @classmethod
    def of(cls, config: SimulateConfig) -> _Federation:
        data = build_federated_data(config.data, num_clients=config.num_clients, seed=config.seed)
        return cls(config, data, simplex_etf(data.num_classes, data.num_classes, seed=config.etf_seed))

    def client(self, index: int) -> LocalClient:
        return build_client(self.config, self.data, index, self.etf, DEVICE)

    def server(self) -> Method:
        return build_method(self.config, self.data.num_classes, self.data.class_names, DEVICE)

    def client_method(self) -> Method:
        """The client side of the method, as a participant builds it: same settings, no generator."""
        cls = get_method(self.config.method)
        ctx = MethodContext(
            num_classes=self.data.num_classes,
            proto_dim=self.data.num_classes,
            class_names=self.data.class_names,
            device=DEVICE,
            seed=self.config.seed,
        )
        return cls(method_settings(self.config), ctx)


@dataclass
class _Round:
    stats: list[TrainStats] = field(default_factory=list)
    uploads: dict[str, bytes] = field(default_factory=dict)
    accuracy: float = 0.0
    client_accuracy: list[float | None] = field(default_factory=list)
    broadcast: bytes | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The figures of this round as ``ktl simulate`` writes them to metrics.jsonl."""
        n = len(self.stats)
        return {
            "accuracy": self.accuracy,
            "client_accuracy": self.client_accuracy,
            "train_loss": sum(s.supervised_loss for s in self.stats) / n,
            "distill_loss": sum(s.distill_loss for s in self.stats) / n,
            "skipped_steps": sum(s.skipped for s in self.stats),
            "bytes_up": sum(len(p) for p in self.uploads.values()),
            "bytes_down": len(self.broadcast) * n if self.broadcast is not None else 0,
            **self.metrics,
        }


def _without_timings(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.endswith("_seconds")}


def run_live(fed: _Federation) -> tuple[list[_Round], list[LocalClient], Method]:
    """``ktl simulate``'s loop: the clients and the method live across rounds."""
    clients = [fed.client(i) for i in range(fed.config.num_clients)]
    method = fed.server()
    rounds = []
    for r in range(1, fed.config.rounds + 1):
        out = _Round()
        for client in clients:
            update = method.client_update(client, r)
            out.stats.append(update.stats)
            assert update.payload is not None
            out.uploads[client.client_id] = update.payload
        out.accuracy, out.client_accuracy = evaluate_clients(clients)
        server = method.server_update(out.uploads, r)
        out.broadcast, out.metrics = server.payload, _without_timings(server.metrics)
        assert out.broadcast is not None
        for client in clients:
            method.client_receive(client, out.broadcast)
        rounds.append(out)
    return rounds, clients, method


class _Store:
    """Per client: its state and its method's client-side state, as safetensors bytes (a node's record)."""

    def __init__(self, fed: _Federation) -> None:
        self.fed = fed
        self.saved: dict[int, tuple[bytes, bytes]] = {}
        for i in range(fed.config.num_clients):  # the state a fresh client starts from
            self.close(i, fed.client(i), fed.client_method())

    def open(self, index: int) -> tuple[LocalClient, Method]:
        """A client and a client-side method built from scratch, then restored."""
        client, method = self.fed.client(index), self.fed.client_method()
        state, method_state = self.saved[index]
        client.load_state_tensors(load(state))
        method.load_client_state(client, load(method_state))
        return client, method

    def close(self, index: int, client: LocalClient, method: Method) -> None:
        self.saved[index] = (save(client.state_tensors()), save(method.client_state(client)))


def run_stateless(fed: _Federation) -> tuple[list[_Round], _Store]:
    """The same rounds, but every client step (train, evaluate, receive) runs on objects rebuilt from the
    saved state and thrown away afterwards; only the server's method object lives on."""
    server = fed.server()
    store = _Store(fed)
    n = fed.config.num_clients
    rounds = []
    for r in range(1, fed.config.rounds + 1):
        out = _Round()
        for i in range(n):
            client, method = store.open(i)
            update = method.client_update(client, r)
            store.close(i, client, method)
            out.stats.append(update.stats)
            assert update.payload is not None
            out.uploads[client.client_id] = update.payload
        out.accuracy, out.client_accuracy = evaluate_clients([store.open(i)[0] for i in range(n)])
        update_server = server.server_update(out.uploads, r)
        out.broadcast, out.metrics = update_server.payload, _without_timings(update_server.metrics)
        assert out.broadcast is not None
        for i in range(n):
            client, method = store.open(i)
            method.client_receive(client, out.broadcast)
            store.close(i, client, method)
        rounds.append(out)
    return rounds, store


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]) or (
            a[name].is_floating_point()
            and torch.equal(a[name].isnan(), b[name].isnan())
            and torch.equal(a[name].nan_to_num(), b[name].nan_to_num())
        ), name


@pytest.mark.parametrize("method", METHODS)
def test_stateless_clients_compute_what_live_clients_compute(tmp_path: Path, method: str) -> None:
    fed = _Federation.of(_config(method))
    live, clients, live_method = run_live(fed)
    stateless, store = run_stateless(fed)
    assert len(live) == len(stateless) == fed.config.rounds
    for a, b in zip(live, stateless, strict=True):
        assert a.stats == b.stats  # per client, bit for bit
        assert a.uploads == b.uploads
        assert (a.accuracy, a.client_accuracy) == (b.accuracy, b.client_accuracy)
        assert a.broadcast == b.broadcast
        assert a.metrics == b.metrics
    assert any(s.distill_loss > 0 for s in live[-1].stats)  # the broadcast did reach training
    # what a node keeps after the last round is what the living objects hold
    for i, client in enumerate(clients):
        state, method_state = store.saved[i]
        _assert_same_tensors(client.state_tensors(), load(state))
        _assert_same_tensors(live_method.client_state(client), load(method_state))

    # and these are ktl simulate's numbers
    config = fed.config.model_copy(update={"out": tmp_path / "run"})
    run_simulation(config, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row, ours in zip(rows, stateless, strict=True):
        for name, value in ours.record().items():
            assert row[name] == value, (row["round"], name)


def _pairs(images: int, latent_dim: int, seed: int) -> Pairs:
    g = torch.Generator().manual_seed(seed)
    return Pairs(
        images=torch.rand(images, 3, 16, 16, generator=g),
        latents=torch.randn(images, latent_dim, generator=g),
        class_ids=torch.arange(images) % 10,
    )


def _assert_indistinguishable(a: LocalClient, b: LocalClient, mu: float) -> None:
    _assert_same_tensors(a.state_tensors(), b.state_tensors())
    pa, pb = a.prototypes(), b.prototypes()
    assert torch.equal(pa.vectors, pb.vectors) and torch.equal(pa.counts, pb.counts)
    assert a.evaluate() == b.evaluate()
    assert a.train(mu=mu) == b.train(mu=mu)
    assert a.train(mu=mu) == b.train(mu=mu)
    _assert_same_tensors(a.state_tensors(), b.state_tensors())


def test_a_restored_client_is_indistinguishable_with_several_rounds_of_pairs() -> None:
    fed = _Federation.of(_config("fedktl", client={"pairs_memory": 3}))
    original = fed.client(0)
    original.train()
    original.receive_pairs(_pairs(10, 8, seed=1))
    original.train(mu=1.0)
    original.receive_pairs(_pairs(7, 8, seed=2))
    state = original.state_tensors()
    assert [k for k in state if k.startswith("received.")] == [
        "received.0.x",
        "received.0.z",
        "received.1.x",
        "received.1.z",
    ]
    assert state["model.projector.weight"].shape[0] == 8
    restored = fed.client(0)
    assert restored.model.projector is None
    global_rng = torch.get_rng_state()
    restored.load_state_tensors(load(save(state)))
    assert torch.equal(torch.get_rng_state(), global_rng)  # loading draws nothing from the global RNG
    assert restored.model.projector is not None
    _assert_indistinguishable(original, restored, mu=1.0)


def test_latent_targets_are_saved_as_class_latents_and_rebuilt() -> None:
    fed = _Federation.of(_config("fedktl-latents"))
    original = fed.client(1)
    original.train()
    original.receive_latent_targets(torch.randn(3, 8), torch.tensor([0, 4, 7]))
    state = original.state_tensors()
    assert not any(k.startswith("received.") for k in state)  # not the client's own images
    assert state["targets.latents"].shape == (fed.data.num_classes, 8)
    restored = fed.client(1)
    restored.load_state_tensors(load(save(state)))
    _assert_indistinguishable(original, restored, mu=1.0)


def test_loading_resets_what_the_saved_client_did_not_have() -> None:
    fed = _Federation.of(_config("fedktl"))
    fresh = fed.client(0).state_tensors()
    used = fed.client(0)
    used.receive_pairs(_pairs(10, 8, seed=3))
    used.train(mu=1.0)
    used.load_state_tensors(fresh)  # back to the start: no projector, no pairs
    assert used.model.projector is None
    _assert_indistinguishable(used, fed.client(0), mu=1.0)


def test_state_is_safetensors_ready_and_refuses_unknown_names() -> None:
    fed = _Federation.of(_config("fedktl"))
    client = fed.client(1)  # resnet-s: BatchNorm
    client.receive_pairs(_pairs(10, 8, seed=4))
    state = client.state_tensors()
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in state.values())
    assert {"rng.batches", "rng.projector"} <= set(state)
    assert any(k.endswith("running_mean") for k in state) and any(
        k.endswith("num_batches_tracked") for k in state
    )
    # copies: saving then changing the client does not change what was saved
    before = state["model.head.weight"].clone()
    client.train(mu=1.0)
    assert torch.equal(state["model.head.weight"], before)
    _assert_same_tensors(load(save(state)), state)
    with pytest.raises(ValueError, match="unknown client state"):
        fed.client(1).load_state_tensors({**state, "optimizer.momentum": torch.zeros(1)})


def test_table_method_client_state_round_trips() -> None:
    fed = _Federation.of(_config("fedproto"))
    client = fed.client(0)
    method = fed.client_method()
    assert method.client_state(client) == {}
    server = fed.server()
    upload = method.client_update(client, 1).payload
    assert upload is not None
    broadcast = server.server_update({client.client_id: upload}, 1).payload
    assert broadcast is not None
    method.client_receive(client, broadcast)
    state = load(save(method.client_state(client)))
    assert sorted(state) == ["mask", "table"] and state["mask"].dtype == torch.bool
    other = fed.client_method()
    other.load_client_state(client, state)
    for a, b in zip(method.tables[client.client_id], other.tables[client.client_id], strict=True):
        assert torch.equal(a, b)
    other.load_client_state(client, {})
    assert client.client_id not in other.tables
