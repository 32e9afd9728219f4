"""ktl's ClientApp: a thin front (it imports Flower only) for the client in `ktl.flower.client`.

Under the Simulation Engine the client runs in this process (a Ray worker that lives for the whole run and
keeps the client in memory). Under the Deployment Engine a SuperNode starts a fresh ``flwr-clientapp``
process for every message, so a client built there would be rebuilt — data, model, optimiser, torch's
import — at every round; instead the message goes to the node's worker (`ktl.flower.worker`), a process
started on the first message that keeps the client in memory across the rounds of a run and answers over
a Unix socket; the client's state still goes into ``context.state`` after every step, and a worker that
lost it (restarted) restores it from there. ``KTL_FLOWER_WORKER=0`` runs every message in the ClientApp's
own process (``1``: always through the worker). A secure-aggregation method's round is masked here by
Flower's ``secaggplus_mod``."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto  # pylint: disable=E0611

if TYPE_CHECKING:
    from ktl.config import SimulateConfig

__all__ = [
    "STATE_RECORD",
    "STEP_RECORD",
    "app",
    "make_client_app",
    "read_frames",
    "records_from_bytes",
    "records_to_bytes",
    "secure_sum_mod",
    "worker_path",
    "worker_socket",
    "write_frames",
]

STATE_RECORD = "ktl-client"  # context.state: the client's state tensors (an ArrayRecord)
STEP_RECORD = "ktl-step"  # context.state: how many steps that state has seen (a ConfigRecord)
_START_TIMEOUT = 600.0  # seconds a new worker may take to answer (it imports torch on a loaded machine)


def secure_sum_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``secaggplus_mod`` for SecAgg+ messages; every other message goes straight to the handler."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


# -- the worker's wire: a JSON header, then length-prefixed blobs (protobuf records, never pickles) ------


def write_frames(sock: socket.socket, header: dict[str, Any], blobs: list[bytes]) -> None:
    head = json.dumps({**header, "blobs": [len(b) for b in blobs]}).encode()
    sock.sendall(struct.pack("!I", len(head)) + head + b"".join(blobs))


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frames(sock: socket.socket) -> tuple[dict[str, Any], list[bytes]]:
    (size,) = struct.unpack("!I", _read_exact(sock, 4))
    header = json.loads(_read_exact(sock, size))
    return header, [_read_exact(sock, n) for n in header.pop("blobs")]


def records_to_bytes(records: RecordDict) -> bytes:
    return bytes(recorddict_to_proto(records).SerializeToString())


def records_from_bytes(data: bytes) -> RecordDict:
    proto = RecordDictProto()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def worker_socket(context: Context) -> Path:
    """The node's worker socket: one per node and partition, in a folder only this user can enter."""
    return worker_path(context.node_id, context.node_config.get("partition-id", "x"))


def worker_path(node_id: int, partition: object) -> Path:
    """`worker_socket` by node id and partition id (its log is beside it, ``.log``)."""
    folder = Path(tempfile.gettempdir()) / f"ktl-flower-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"node-{node_id}-p{partition}.sock"


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _start_worker(path: Path) -> socket.socket:
    """Start the node's worker (one starter wins a lock file) and wait until it answers."""
    lock = path.with_suffix(".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        if time.time() - lock.stat().st_mtime > _START_TIMEOUT:  # a starter that died
            lock.unlink(missing_ok=True)
        fd = -1
    if fd >= 0:
        os.close(fd)
        log = open(path.with_suffix(".log"), "ab")  # noqa: SIM115 - the worker owns it from here
        subprocess.Popen(  # noqa: S603 - this interpreter, ktl's own module
            [sys.executable, "-m", "ktl.flower.worker", str(path), "--parent-pid", str(os.getppid())],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
    deadline = time.monotonic() + _START_TIMEOUT
    while (sock := _connect(path)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"ktl's node worker did not start within {_START_TIMEOUT:.0f}s (see {path.with_suffix('.log')})"
            )
        time.sleep(0.2)
    lock.unlink(missing_ok=True)
    return sock


def _ask_worker(kind: str, message: Message, context: Context) -> tuple[RecordDict, int | None]:
    """One message through the node's worker; its state records are put back into ``context.state``."""
    path = worker_socket(context)
    step = context.state.config_records.get(STEP_RECORD)
    header = {
        "kind": kind,
        "step": int(cast(int, step["step"])) if step is not None else -1,
        "run_id": int(context.run_id),
        "node_id": int(context.node_id),
        "node_config": dict(context.node_config),
        "run_config": dict(context.run_config),
    }
    content = records_to_bytes(message.content)
    state: bytes | None = None
    for _ in range(2):  # the second time with the saved state: the worker did not hold the client
        sock = _connect(path) or _start_worker(path)
        with sock:
            blobs = [content] if state is None else [content, state]
            write_frames(sock, {**header, "with_state": state is not None}, blobs)
            answer, parts = read_frames(sock)
        if answer.get("need_state"):
            state = records_to_bytes(context.state)
            continue
        if "error" in answer:
            raise RuntimeError(f"ktl's node worker failed: {answer['error']}")
        for key, record in records_from_bytes(parts[1]).items():
            context.state[key] = record
        return records_from_bytes(parts[0]), answer.get("numpy_seed")
    raise RuntimeError("ktl's node worker asked for the client's state twice")


def _use_worker() -> bool:
    """Through the node's worker under the Deployment Engine (a ``flwr-clientapp`` process per message)."""
    choice = os.environ.get("KTL_FLOWER_WORKER", "auto")
    if choice in ("0", "1"):
        return choice == "1"
    return Path(sys.argv[0]).name.startswith("flwr-clientapp")


def _handle(kind: str, config: SimulateConfig | None, message: Message, context: Context) -> Message:
    if config is None and _use_worker():
        content, seed = _ask_worker(kind, message, context)
    else:
        from ktl.flower.client import HANDLERS  # torch and the client: only where they run
        from ktl.flower.config import from_run_config

        resolved = config if config is not None else from_run_config(context.run_config)[0]
        answer = HANDLERS[kind](resolved, message.content, context)
        content, seed = answer.content, answer.numpy_seed
    if seed is not None:  # SecAgg+'s rounding (in secaggplus_mod, after this returns) draws from numpy
        np.random.seed(seed)
    return Message(content, reply_to=message)


def make_client_app(config: SimulateConfig | None = None) -> ClientApp:
    """The ClientApp; with ``config`` its settings are fixed (``ktl flower simulate``: in this process),
    else they come from the run config (``flwr run``)."""
    app = ClientApp(mods=[secure_sum_mod])

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return _handle("query", config, message, context)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return _handle("train", config, message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return _handle("evaluate", config, message, context)

    return app


app = make_client_app()
