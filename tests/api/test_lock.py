"""One server per data folder, and a busy port refused before anything loads (issue 23, item 4)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ktl.api import create_app
from ktl.api.lock import LOCK_NAME, DataDirLock
from ktl.cli import main
from ktl.errors import ConfigError
from tests.api.conftest import ADMIN, auth, make_settings

# Another process taking the lock as `DataDirLock` does (flock on ktl.lock, its holder's line written),
# without importing ktl: a Python start-up costs tens of seconds on a loaded 2-core machine with torch.
HOLD = """
import fcntl, os, pathlib, sys
root = pathlib.Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
f = open(root / "ktl.lock", "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
f.truncate(0); f.write(f"pid {os.getpid()}: ktl serve (test)\\n"); f.flush()
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def held(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Another process holding the data folder's lock, as a running ``ktl serve`` does."""
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield data, proc
    proc.kill()
    proc.wait(10)


def test_a_second_server_and_a_repair_refuse_a_held_folder_while_reads_go_on(
    held: tuple[Path, subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Old code: two servers on one folder both started and published the same round; ``--repair`` on a
    live server deleted a running job's ``.partial`` file."""
    data, proc = held
    partial = data / "jobs" / ".job-x.safetensors.partial"  # a running job's file in progress
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"in progress")
    with pytest.raises(ConfigError, match=rf"in use by pid {proc.pid}: ktl serve"):
        create_app(make_settings(data))
    assert main(["admin", "check", "--data-dir", str(data), "--repair"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pid {proc.pid}" in err and "--repair refused" in err
    assert partial.read_bytes() == b"in progress"  # nothing was cleared under the live server
    assert main(["admin", "check", "--data-dir", str(data)]) in (0, 1)  # read-only: goes on
    assert "in use" not in capsys.readouterr().err

    proc.send_signal(signal.SIGKILL)  # the kernel drops a dead holder's lock: a restart is never blocked
    proc.wait(10)
    with TestClient(create_app(make_settings(data))) as http:
        assert http.get("/v1/federations", headers=auth(ADMIN)).status_code == 200
        assert "pid " in (data / LOCK_NAME).read_text()


def test_the_lock_is_released_when_the_server_stops(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    with TestClient(create_app(settings)):
        pass
    probe = subprocess.run(
        [sys.executable, "-c", HOLD, str(settings.data_dir)],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "held", probe.stderr
    with DataDirLock(settings.data_dir, "test"), DataDirLock(settings.data_dir, "test"):
        pass  # one process shares its lock (a server and its restart in one test process)


def test_a_busy_port_is_refused_in_one_line_before_anything_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Old code: uvicorn said so only after the whole start-up (9.6 s), as a traceback line, exit 1."""
    import ktl.api.service as service_module

    loaded: list[object] = []
    monkeypatch.setattr(service_module, "load_generator", lambda spec, device: loaded.append(spec))
    monkeypatch.setenv("KTL_ADMIN_TOKEN", ADMIN)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        code = main(["serve", "--data-dir", str(tmp_path / "d"), "--port", str(port), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err and "in use" in err, err
    assert loaded == [] and not (tmp_path / "d" / LOCK_NAME).exists()  # refused before the folder is taken
    assert time.monotonic() - started < 5
