"""A SuperNode's ktl worker: keeps the node's client in memory across the rounds of a run.

Started by ktl's ClientApp on a node's first message under the Deployment Engine (`ktl.flower.client_app`;
``python -m ktl.flower.worker SOCKET --parent-pid PID``), it answers the ClientApp's messages over a Unix
socket, one at a time, with the handlers of `ktl.flower.client`: a message's content and the node's
context in (Flower's protobuf records and JSON, never pickles), the reply's content and the client's state
records out. When it does not hold the client at the step the node's ``context.state`` saw last, it asks
for that state and restores the client from it. It exits when the process that started its ClientApps (the
SuperNode's executor) is gone, when its socket file is removed, or after ``--idle`` seconds without a
message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import time
import traceback
from functools import lru_cache
from pathlib import Path

from flwr.app import ConfigRecord, Context, RecordDict

from ktl.config import SimulateConfig
from ktl.flower.client import HANDLERS, holds, saved_state
from ktl.flower.client_app import STEP_RECORD, read_frames, records_from_bytes, records_to_bytes, write_frames
from ktl.flower.config import from_run_config

__all__ = ["main", "serve"]

logger = logging.getLogger("ktl.flower.worker")  # also when run as __main__


@lru_cache(maxsize=8)
def _config(run_config_json: str) -> SimulateConfig:
    return from_run_config(json.loads(run_config_json))[0]


def _answer(header: dict[str, object], blobs: list[bytes]) -> tuple[dict[str, object], list[bytes]]:
    node_config = dict(header["node_config"])  # type: ignore[call-overload]
    run_config = dict(header["run_config"])  # type: ignore[call-overload]
    config = _config(json.dumps(run_config, sort_keys=True))
    state = records_from_bytes(blobs[1]) if header.get("with_state") else RecordDict()
    context = Context(int(header["run_id"]), int(header["node_id"]), node_config, state, run_config)  # type: ignore[call-overload]
    if not header.get("with_state"):
        step = int(header.get("step", -1))  # type: ignore[call-overload]
        context.state[STEP_RECORD] = ConfigRecord({"step": step})
        if step < 0 or not holds(config, context):
            return {"need_state": True}, []
    answer = HANDLERS[str(header["kind"])](config, records_from_bytes(blobs[0]), context)
    return {"numpy_seed": answer.numpy_seed}, [
        records_to_bytes(answer.content),
        records_to_bytes(saved_state(context)),
    ]


def _parent_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(path: Path, *, parent_pid: int | None, idle: float) -> None:
    """Answer on ``path`` until the parent is gone or nothing arrives for ``idle`` seconds."""
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(8)
    server.settimeout(2.0)
    last = time.monotonic()
    logger.info("ktl node worker on %s (pid %d)", path, os.getpid())
    try:
        while time.monotonic() - last < idle:
            if parent_pid is not None and not _parent_alive(parent_pid):
                logger.info("the SuperNode is gone: the worker stops")
                break
            if not path.exists():  # removed: a new worker takes the node, or the operator stops this one
                break
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                header, blobs = read_frames(conn)
                t0 = time.monotonic()
                try:
                    reply, parts = _answer(header, blobs)
                except Exception as exc:  # the ClientApp reports it to Flower as this node's failure
                    logger.error("%s", traceback.format_exc())
                    reply, parts = {"error": f"{type(exc).__name__}: {exc}"}, []
                # one line per message, its work's time (ktl bench flower --engine deployment reads it),
                # written before the reply: once the run has its answers, every line is in the log
                logger.info(
                    "%s message answered in %.3f s%s", header.get("kind"), time.monotonic() - t0,
                    " (state asked for)" if reply.get("need_state") else "",
                )  # fmt: skip
                write_frames(conn, reply, parts)
            last = time.monotonic()
    finally:
        server.close()
        path.unlink(missing_ok=True)
        logger.info("ktl node worker stops")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ktl.flower.worker", description=__doc__)
    parser.add_argument("socket", type=Path)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--idle", type=float, default=1800.0, help="seconds without a message before exiting")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()  # the client's own lines go through Flower's logger ("flwr")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("ktl").addHandler(handler)
    logging.getLogger("ktl").setLevel(logging.INFO)
    serve(args.socket, parent_pid=args.parent_pid, idle=args.idle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
