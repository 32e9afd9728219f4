"""Running a ktl server from code: in this process (a uvicorn thread) or as a ``ktl serve`` subprocess.

Used by ``ktl demo``, the tests and the benchmarks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

__all__ = ["ServeProcess", "ServerThread", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn serving an app in a background thread of this process."""

    def __init__(self, app: object, host: str, port: int) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="ktl-server", daemon=True)
        self.url = f"http://{host}:{port}"

    def start(self, timeout: float = 120.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the ktl server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class ServeProcess:
    """``python -m ktl serve`` in a subprocess on a free loopback port, its output in a log file (a pipe
    nobody reads fills up and blocks the server)."""

    def __init__(self, data_dir: Path, admin_token: str, *, log: Path | None = None, **env: str) -> None:
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or self.data_dir.parent / "serve.log"
        self.env = {**os.environ, "KTL_ADMIN_TOKEN": admin_token, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> ServeProcess:
        cmd = [sys.executable, "-m", "ktl", "serve", "--data-dir", str(self.data_dir), "--port", str(self.port),
               "--log-level", "warning"]  # fmt: skip
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ktl serve exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("ktl serve did not become ready")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.pid

    def kill9(self) -> None:
        """Kill without warning (SIGKILL), as a crash would."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
