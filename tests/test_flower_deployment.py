"""ktl on Flower's Deployment Engine, on loopback: a SuperLink and four SuperNodes (each with its own
partition through ``--node-config``), ``flwr run`` of the app, the summary compared with ``ktl simulate``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ktl.api.process import free_port
from ktl.config import build_config
from ktl.simulate import run_simulation

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:  # its own process group: stopping it stops the helpers it starts too
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    """Until the SuperLink accepts connections (a fixed sleep failed on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no SuperLink on port {port} after {timeout:.0f}s"
        time.sleep(0.5)


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 (openssl), as a site's operator would make them."""
    folder.mkdir()
    ca, ca_key, key, csr, crt = (
        folder / n for n in ("ca.crt", "ca.key", "server.key", "server.csr", "server.crt")
    )
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
            "-days", "1", "-subj", "/CN=ktl-test-ca")  # fmt: skip
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=127.0.0.1",
    )
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(crt), "-days", "1", "-extfile", str(ext))  # fmt: skip
    return {"ca": ca, "key": key, "crt": crt}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("security", "method"),
    [
        ("insecure", "fedproto"),
        ("tls", "fedproto"),
        ("tls+auth", "fedproto"),
        ("tls+secagg", "fedproto-secagg"),
        ("insecure", "fml"),  # weights both ways (a shared CNN), the shared model kept on each node
    ],
    ids=["insecure", "tls", "tls+auth", "tls+secagg", "insecure-fml"],
)
def test_four_supernodes_on_loopback_run_the_app_and_give_simulates_accuracies(
    tmp_path: Path, security: str, method: str
) -> None:
    """With ``tls+auth`` the SuperLink admits only SuperNodes whose public keys the operator registered
    (``flwr supernode register``); a fifth SuperNode with an unregistered key never takes part. With
    ``tls+secagg`` the method is fedproto-secagg: each round runs Flower's SecAgg+ between the processes."""
    tls, auth = security != "insecure", security == "tls+auth"
    port = free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr"),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    (tmp_path / "flwr").mkdir()
    if tls:  # certificates the test makes; the SuperNodes and the CLI trust its CA
        certs = _certificates(tmp_path / "certs")
        link_security = ["--ssl-certfile", str(certs["crt"]), "--ssl-keyfile", str(certs["key"]),
                         "--ssl-ca-certfile", str(certs["ca"])]  # fmt: skip
        node_security = ["--root-certificates", str(certs["ca"])]
        connection = f'root-certificates = "{certs["ca"]}"'
    else:
        link_security, node_security, connection = ["--insecure"], ["--insecure"], "insecure = true"
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\n{connection}\n'
    )
    if auth:
        link_security.append("--enable-supernode-auth")
    procs = [
        _start(
            [str(BIN / "flower-superlink"), *link_security, "--disable-runtime-dependency-installation",
             "--port", str(port), "--database", str(tmp_path / "superlink.db")],
            tmp_path / "superlink.log",
            env,
        )
    ]  # fmt: skip
    try:
        _wait_for_port(port, procs[0], tmp_path / "superlink.log")
        for i in range(5 if auth else 4):
            keys: list[str] = []
            if auth:  # an ECDSA key pair per SuperNode; the operator registers the first four only
                key = tmp_path / f"supernode-{i}.key"
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)], check=True
                )
                keys = ["--auth-supernode-private-key", str(key), "--auth-supernode-public-key", f"{key}.pub"]
                if i < 4:
                    registered = subprocess.run(
                        [str(BIN / "flwr"), "supernode", "register", f"{key}.pub", "loopback"],
                        env=env, capture_output=True, timeout=60,
                    )  # fmt: skip
                    assert registered.returncode == 0, registered.stdout.decode() + registered.stderr.decode()
            procs.append(
                _start(
                    [str(BIN / "flower-supernode"), *node_security, *keys, "--superlink", f"127.0.0.1:{port}",
                     "--node-config", f"partition-id={i} num-partitions=4", "--port", str(free_port())],
                    tmp_path / f"supernode-{i}.log",
                    env,
                )
            )  # fmt: skip
        out = tmp_path / "out"
        run_config = f"method='{method}' rounds=2 num_clients=4 flower.min-nodes=4 flower.out='{out}'"
        done = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "loopback", "--run-config", run_config],
            cwd=ROOT, env=env, capture_output=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout.decode()[-2000:] + done.stderr.decode()[-2000:]
        deadline = time.monotonic() + 400
        while not (out / "summary.json").exists():
            assert time.monotonic() < deadline, (tmp_path / "superlink.log").read_text()[-3000:]
            time.sleep(1)
        summary = json.loads((out / "summary.json").read_text())
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    assert summary["failures"] == 0 and len(summary["accuracy"]) == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in rows] == [[0, 1, 2, 3]] * 2  # with auth: the fifth never joined
    torch.manual_seed(1234)
    config = build_config(
        preset="smoke",
        overrides={"method": method, "rounds": 2, "num_clients": 4, "out": str(tmp_path / "sim")},
    )
    run_simulation(config, progress=False)
    simulated = [
        json.loads(x)["accuracy"] for x in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()
    ]
    if not method.endswith("-secagg"):
        assert summary["accuracy"] == simulated
    else:  # round 1 trains before any broadcast; round 2's table is SecAgg+'s sum, ≤ 4 levels of 2/2**22 away
        assert summary["accuracy"][0] == simulated[0]
        assert abs(summary["accuracy"][1] - simulated[1]) <= 0.02
        assert all(r["bytes_up"] is None for r in rows)  # the server never held a payload
