"""Running a ktl server: its uvicorn options, in this process (a uvicorn thread) or as a ``ktl serve``
subprocess.

Used by ``ktl serve``, ``ktl demo``, the tests and the benchmarks.

Connections are bounded here, below ASGI (which sees a request only once its head is complete):
`BoundedH11Protocol` closes a connection whose request head has not arrived in time, and applies
``limit_concurrency`` to requests in progress, never to the health routes; `raise_fd_limit` lifts the
open-file limit, so that idle or stalled sockets exhaust neither file descriptors nor the concurrency
limit before they time out.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, ClassVar

import httpx
import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from ktl.api.settings import ServerSettings
from ktl.errors import ConfigError

__all__ = [
    "HEALTH_PATHS",
    "MAX_HEAD_BYTES",
    "BoundedH11Protocol",
    "bind_port",
    "memory_cgroup",
    "ServeProcess",
    "ServerThread",
    "free_port",
    "raise_fd_limit",
    "server_options",
]

logger = logging.getLogger(__name__)

HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""GET routes that ``limit_concurrency`` never refuses: a probe must not fail because the API is busy."""
MAX_HEAD_BYTES = 16 * 1024
"""Largest request line + headers (h11's default, set explicitly): larger heads get 400."""

# Per server: the connections waiting for a request head (new, idle keep-alive, half-sent).
_WAITING: weakref.WeakKeyDictionary[ServerState, set[BoundedH11Protocol]] = weakref.WeakKeyDictionary()


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, bounded for exposure to untrusted clients.

    * A request head (request line and headers) must arrive in full within `head_timeout_s` of the
      connection opening, or of its first byte after the previous response; otherwise the connection is
      closed. uvicorn's own h11 protocol waits forever on a half-sent head (its keep-alive timer is
      cancelled by the first byte), and the app cannot help: ASGI sees a request once its head is complete.
    * ``limit_concurrency`` (uvicorn answers 503 beyond it) counts the requests in progress. uvicorn
      counts open connections, so a few hundred idle sockets would turn every request into a 503; those
      are bounded by the head timeout and the open-file limit instead.
    * GET / HEAD on `HEALTH_PATHS` are never refused by ``limit_concurrency``.

    It relies on `H11Protocol` setting ``self.scope`` for a request before it reads
    ``self.limit_concurrency`` (checked against uvicorn 0.54; `tests/api/test_limits.py` would see a
    change); `server_options` makes a subclass with the settings' timeout.
    """

    head_timeout_s: ClassVar[float] = 30.0

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._limit: int | None = None
        super().__init__(config, server_state, app_state, _loop)
        self._head_timer: asyncio.TimerHandle | None = None
        self._waiting = _WAITING.setdefault(server_state, set())

    @property
    def limit_concurrency(self) -> int | None:
        """Read by `H11Protocol` when a request's head is complete (``self.scope`` is that request)."""
        scope = getattr(self, "scope", None)
        if self._limit is None or scope is None:
            return self._limit
        if scope["method"] in ("GET", "HEAD") and scope["path"] in HEALTH_PATHS:
            return None
        # uvicorn refuses when len(connections) >= limit: discount the others that wait for a head.
        return self._limit + len(self._waiting) - (self in self._waiting)

    @limit_concurrency.setter
    def limit_concurrency(self, value: int | None) -> None:
        self._limit = value

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._waiting.add(self)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting.discard(self)
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self in self._waiting:
            self._arm()  # the first byte of a head after a response (idle time is the keep-alive's)
        scope = self.scope
        super().data_received(data)
        if self.scope is not scope:
            self._head_arrived()

    def on_response_complete(self) -> None:
        self._waiting.add(self)
        scope = self.scope
        super().on_response_complete()
        if self.scope is not scope:  # a pipelined request was waiting
            self._head_arrived()

    def _head_arrived(self) -> None:
        self._waiting.discard(self)
        self._disarm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self in self._waiting and not self.transport.is_closing():
            logger.debug("closing a connection whose request head did not arrive in %gs", self.head_timeout_s)
            self.transport.close()


def server_options(settings: ServerSettings) -> dict[str, Any]:
    """uvicorn's options for ``settings``: the bounded protocol, ``limit_concurrency``, the keep-alive."""
    protocol = type("BoundedH11Protocol", (BoundedH11Protocol,), {"head_timeout_s": settings.body_timeout_s})
    return {
        "http": protocol,
        "limit_concurrency": settings.limit_concurrency,
        "timeout_keep_alive": settings.keep_alive_s,  # a float is fine: it goes to loop.call_later
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        "timeout_graceful_shutdown": 10,
    }


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit (each connection is one file).

    Returns the soft limit before and after; ``(-1, -1)`` where there is no such limit (Windows).
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return -1, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is capped by the kernel (Linux: fs.nr_open; macOS: kern.maxfilesperproc).
    wanted = [hard] if hard != resource.RLIM_INFINITY else [1 << 20, 65536, 10240]
    for target in wanted:
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        return soft, target
    return soft, soft


def bind_port(host: str, port: int) -> socket.socket:
    """A listening-ready socket bound to ``host:port`` (as uvicorn binds it), or `ConfigError` in one line
    when the port is taken: ``ktl serve`` binds first, before the generators load (uvicorn would say it
    only after the whole start-up, as a traceback line)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"cannot bind to {host}:{port}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = "the port is in use (another server?)" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def memory_cgroup(limit_bytes: int, name: str) -> Path | None:
    """A cgroup (v1 memory controller) ``name`` limited to ``limit_bytes`` (swap included where the kernel
    has it), for `ServeProcess`'s ``cgroup``; None where that is not possible (not root, no writable v1
    memory controller). Tests and benchmarks only."""
    root = Path("/sys/fs/cgroup/memory")
    if os.geteuid() != 0 or not (root / "cgroup.procs").exists():
        return None
    group = root / name
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit_bytes))
    except OSError:
        return None
    return group


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn serving an app in a background thread of this process."""

    def __init__(self, app: object, host: str, port: int) -> None:
        settings = getattr(getattr(getattr(app, "state", None), "service", None), "settings", None)
        options = server_options(settings) if isinstance(settings, ServerSettings) else {}
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", **options)  # type: ignore[arg-type]
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

    def __init__(
        self,
        data_dir: Path,
        admin_token: str,
        *,
        log: Path | None = None,
        nofile: tuple[int, int] | None = None,
        cgroup: Path | None = None,
        **env: str,
    ) -> None:
        """``nofile``: the (soft, hard) limit on open files to start the server with; ``cgroup``: a cgroup
        folder the server joins before it starts (e.g. one with a memory limit) — both for tests."""
        self.data_dir = Path(data_dir)
        self.nofile = nofile
        self.cgroup = cgroup
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or self.data_dir.parent / "serve.log"
        self.env = {**os.environ, "KTL_ADMIN_TOKEN": admin_token, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0, *, low_disk_ok: bool = False) -> ServeProcess:
        """Start ``ktl serve`` and wait until ``/readyz`` says ready — or, with ``low_disk_ok``, until it
        answers ``low_disk`` (up, refusing writes with 507: a restart inside a disk-full window)."""
        cmd = [sys.executable, "-m", "ktl", "serve", "--data-dir", str(self.data_dir), "--port", str(self.port),
               "--log-level", "warning"]  # fmt: skip
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._preexec()
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ktl serve exited: {self.log.read_text()[-3000:]}")
            try:
                answer = httpx.get(f"{self.url}/readyz", timeout=1)
                if answer.status_code == 200 or (low_disk_ok and answer.json().get("status") == "low_disk"):
                    return self
            except (httpx.TransportError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("ktl serve did not become ready")
            time.sleep(0.2)

    def _preexec(self) -> Any:
        if self.nofile is None and self.cgroup is None:
            return None
        import resource

        limits, procs = self.nofile, self.cgroup / "cgroup.procs" if self.cgroup else None

        def setup() -> None:  # in the child, before exec
            if limits is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            if procs is not None:
                procs.write_text(str(os.getpid()))

        return setup

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
