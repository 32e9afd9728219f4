"""The one federation runner (`ktl.runner`): the in-process transport and Flower's Grid transport give the
same run folder and accuracies; a malformed reply from one Flower node is that node's failure and the round
goes on. Flower's apps run here on an in-memory Grid (no Ray, no processes): every message goes straight to
ktl's ClientApp handlers with one ``Context`` per node, as a SuperNode keeps it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from ktl.config import SimulateConfig, build_config
from ktl.flower import client_app
from ktl.flower.config import FlowerOptions
from ktl.flower.records import from_tensors
from ktl.flower.server_app import run_rounds
from ktl.runner import weighted_accuracy
from tests.conftest import simulate_like_ray
from tests.run_folders import assert_same_run_folders, rows


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Who sends the ServerApp's messages (a SuperLink sets it for a real ServerApp process)."""
    for name, value in (("_run_id", 11), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


HANDLERS = {
    "query": client_app.query_step,
    "train": client_app.train_step,
    "evaluate": client_app.evaluate_step,
}


class LoopbackGrid(Grid):
    """Flower's Grid protocol in memory: node ``100 + i`` holds partition ``i``; ``bad`` partitions answer
    ``train`` with a payload no method accepts."""

    def __init__(self, config: SimulateConfig, *, run_id: int, bad: Iterable[int] = ()) -> None:
        self.config = config
        self.bad = set(bad)
        self.contexts = {
            100 + i: Context(run_id, 100 + i, {"partition-id": i, "num-partitions": config.num_clients},
                             RecordDict(), {})
            for i in range(config.num_clients)
        }  # fmt: skip
        self.messages = 0

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        return None

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            reply = HANDLERS[message.metadata.message_type](self.config, message, context)
            self.messages += 1
            partition = context.node_config["partition-id"]
            if partition in self.bad and "payload" in reply.content.array_records:
                garbage = {"prototypes": torch.full((2, 10), 5.0), "class_ids": torch.tensor([0, 0]),
                           "counts": torch.tensor([1, 1])}  # fmt: skip
                reply.content["payload"] = from_tensors(garbage)
            out.append(reply)
        return out


def _config(tmp_path: Path, name: str, method: str) -> SimulateConfig:
    overrides = {"method": method, "num_clients": 3, "rounds": 2, "aligner": {"steps": 20}}
    return build_config(preset="smoke", overrides={**overrides, "out": str(tmp_path / name)})


def test_the_flower_grid_transport_writes_simulates_run_folder(tmp_path: Path) -> None:
    """The same files (client weights aside: they stay on the nodes), metrics keys and types, summary and
    config keys; the same per-round and per-client accuracies at one thread; the ClientApp kept each client
    in memory (one build per partition for the whole run, not one per round)."""
    torch.manual_seed(1234)
    simulate_like_ray(_config(tmp_path, "sim", "fedktl"))
    config = _config(tmp_path, "flower", "fedktl")
    grid = LoopbackGrid(config, run_id=11)
    client_app._HELD.clear()
    built = []
    original = client_app.build_client
    client_app.build_client = lambda *a, **k: built.append(a[2]) or original(*a, **k)  # type: ignore[assignment]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_rounds(grid, config, FlowerOptions())
    finally:
        torch.set_num_threads(threads)
        client_app.build_client = original  # type: ignore[assignment]
    assert_same_run_folders(tmp_path / "sim", tmp_path / "flower", clients=False)
    assert sorted(built) == [0, 1, 2]  # each client built once: at the query, then held across rounds
    assert summary["transport"]["name"] == "flower" and summary["failures"] == 0
    assert (tmp_path / "flower" / "rounds" / "quality-0002.json").is_file()  # the round's artefacts too


def test_a_malformed_reply_from_one_node_is_its_failure_and_the_round_goes_on(tmp_path: Path) -> None:
    config = _config(tmp_path, "bad", "fedproto")
    summary = run_rounds(LoopbackGrid(config, run_id=12, bad=[1]), config, FlowerOptions())
    lines = rows(tmp_path / "bad")
    assert [line["missed"] for line in lines] == [{"client-01-resnet-s": "invalid"}] * 2
    assert [line["trained"] for line in lines] == [2, 2] and summary["failures"] == 2
    # still evaluated, as every client is (its training happened; only its upload was refused)
    assert all(None not in line["client_accuracy"] for line in lines)
    assert summary["rounds_run"] == 2 and 0 < summary["final_accuracy"] <= 1
    assert json.loads((tmp_path / "bad" / "summary.json").read_text())["failures"] == 2


def test_weighted_accuracy_leaves_out_clients_not_scored() -> None:
    assert weighted_accuracy([(3, 4), None, (1, 4)]) == (0.5, [0.75, None, 0.25])
