"""The one federation runner (`ktl.runner`): the in-process transport and Flower's Grid transport give the
same run folder and accuracies; a malformed reply from one Flower node is that node's failure and the round
goes on. Flower's apps run here on an in-memory Grid (no Ray, no processes): every message goes straight to
ktl's ClientApp handlers with one ``Context`` per node, as a SuperNode keeps it."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from ktl.benchmarks.flower import worker_trains
from ktl.cli import main
from ktl.config import SimulateConfig, build_config
from ktl.flower import client, client_app
from ktl.flower.config import FlowerOptions, to_run_config
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


class LoopbackGrid(Grid):
    """Flower's Grid protocol in memory: node ``100 + i`` holds partition ``i``; ``bad`` partitions answer
    ``train`` with a payload no method accepts."""

    def __init__(
        self, config: SimulateConfig, *, run_id: int, bad: Iterable[int] = (), deployed: bool = False
    ) -> None:
        """``deployed``: the ClientApp is given no config, only the run config (as under ``flwr run``)."""
        self.config = None if deployed else config
        self.bad = set(bad)
        run_config = to_run_config(config) if deployed else {}
        self.contexts = {
            100 + i: Context(run_id, 100 + i, {"partition-id": i, "num-partitions": config.num_clients},
                             RecordDict(), run_config)
            for i in range(config.num_clients)
        }  # fmt: skip
        self.messages = 0
        self.pending: dict[str, Message] = {}

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        return None

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each message is answered at once; its reply waits to be pulled."""
        ids = []
        for message in messages:
            ids.append(f"m{len(self.pending)}-{self.messages}")
            message.metadata.__dict__["_message_id"] = ids[-1]
            self.pending[ids[-1]] = self.send_and_receive([message])[0]
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            reply = client_app._handle(message.metadata.message_type, self.config, message, context)
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
    client._HELD.clear()
    built = []
    original = client.build_client
    client.build_client = lambda *a, **k: built.append(a[2]) or original(*a, **k)  # type: ignore[assignment]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_rounds(grid, config, FlowerOptions())
    finally:
        torch.set_num_threads(threads)
        client.build_client = original  # type: ignore[assignment]
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


def test_under_the_deployment_engine_the_node_worker_keeps_each_client_across_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``flwr-clientapp`` process per message (``KTL_FLOWER_WORKER=1`` here): each message goes to the
    node's worker, started once, which builds its client once for the run and keeps it; the accuracies are
    those of the client run in the ClientApp's own process. Removing a worker's socket stops it."""
    monkeypatch.setenv("KTL_FLOWER_WORKER", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the worker's torch threads, as the reference's below
    short = Path(tempfile.mkdtemp(prefix="ktlw-", dir="/tmp"))  # a Unix socket path is short
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    overrides = {"method": "fedproto", "num_clients": 2, "rounds": 3}
    config = build_config(preset="smoke", overrides={**overrides, "out": str(tmp_path / "worker")})
    try:
        deployed = run_rounds(LoopbackGrid(config, run_id=21, deployed=True), config, FlowerOptions())
    finally:
        sockets = list(short.rglob("*.sock"))
        for sock in sockets:
            sock.unlink()
    logs = sorted(short.rglob("*.log"))
    assert len(sockets) == 2 and len(logs) == 2  # one worker per node
    for log in logs:  # built at the first message (the query), then held: never restored
        text = log.read_text()
        assert text.count("built for run 21") == 1 and "restored" not in text, text[-2000:]
        assert len(worker_trains(log)) == 3  # one line per round's message: what the deployment bench reads
    reference = build_config(preset="smoke", overrides={**overrides, "out": str(tmp_path / "here")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = run_rounds(LoopbackGrid(reference, run_id=22), reference, FlowerOptions())
    finally:
        torch.set_num_threads(threads)
    assert deployed["accuracy"] == here["accuracy"] and deployed["failures"] == 0
    deadline = time.monotonic() + 60
    while not all("worker stops" in log.read_text() for log in logs):  # their socket is gone
        assert time.monotonic() < deadline, "a node worker did not stop when its socket was removed"
        time.sleep(0.2)
    shutil.rmtree(short)


def test_weighted_accuracy_leaves_out_clients_not_scored() -> None:
    assert weighted_accuracy([(3, 4), None, (1, 4)]) == (0.5, [0.75, None, 0.25])


@pytest.mark.slow
def test_one_smoke_federation_through_the_three_commands_gives_one_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ktl simulate``, ``ktl flower simulate`` (Ray) and ``ktl demo`` (HTTP), as a user types them, at
    one torch thread (as each Ray worker trains): the same files (Flower's client weights stay on its
    nodes; the demo's server folder aside), metrics keys and types, summary and config keys, and the same
    per-round and per-client accuracies."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    common = ["--preset", "smoke", "--method", "fedproto", "--rounds", "2", "--seed", "5"]
    try:
        assert main(["simulate", *common, "--num-clients", "3", "--out", str(tmp_path / "sim")]) == 0
        assert (
            main(["flower", "simulate", *common, "--num-clients", "3", "--out", str(tmp_path / "flower")])
            == 0
        )
        assert main(["demo", *common, "--clients", "3", "--out", str(tmp_path / "demo")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert_same_run_folders(tmp_path / "sim", tmp_path / "demo")
    assert_same_run_folders(tmp_path / "sim", tmp_path / "flower", clients=False)
