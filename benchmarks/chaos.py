"""``ktl bench chaos``: a bounded soak of a real ``ktl serve`` on loopback, with failures injected.

Healthy federations (one fedktl, one fedproto) of ``--clients`` clients each run ``--rounds`` rounds
while the server is killed with SIGKILL at random moments (``--kills``), a disk-full window fills the
data folder's file system (root only: the data folder is a small tmpfs the benchmark mounts), and a
*poison* federation — a FedKTL round whose server step is long, so that kills land inside it — runs
beside them. Clients upload through the SDK (retrying through restarts, 5xx, 429 and 507) and wait for
each round. At the end it checks, against the server: every acknowledged upload is in its round (0 lost),
every healthy round is published, the poison round ended (published or failed with a reason, never
re-run forever); and reports ``/healthz`` latency percentiles while the server was up.

Before the soak, two checks of issue 23: ``--strangers`` sockets each send a POST head (``Content-Length:
100``, no token) and one byte, and the same authenticated calls are timed without and with them, side by
side (they used to get 503 for 30 s); and ``--memory-limit-mb`` starts a second server in a memory cgroup
of that size (root and a writable cgroup v1 memory controller; else "not measured") and sends a spec
estimated above a quarter of that limit but below a quarter of the host's memory: it must be refused
(``too_costly``), with the limit the server derived from the cgroup.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
import torch.nn.functional as F

from ktl.api.process import ServeProcess, free_port, memory_cgroup
from ktl.benchmarks.common import machine, report
from ktl.clients.sdk import KtlApiError, KtlHttpClient
from ktl.records import Prototypes

__all__ = ["add_arguments", "main", "run"]

logger = logging.getLogger(__name__)

ADMIN = "chaos-admin-token"
FAST_ALIGNER = {"steps": 30, "prior_samples": 64, "bandwidth_samples": 256}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=20, help="clients per healthy federation")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per healthy federation")
    parser.add_argument("--kills", type=int, default=4, help="SIGKILLs of the server, at random moments")
    parser.add_argument(
        "--disk-window", type=float, default=5.0, help="seconds of a full disk (root; 0: none)"
    )
    parser.add_argument("--poison-steps", type=int, default=20_000, help="aligner steps of the poison round")
    parser.add_argument(
        "--strangers", type=int, default=260, help="slow unauthenticated bodies held open (0: skip)"
    )
    parser.add_argument(
        "--memory-limit-mb",
        type=int,
        default=3072,
        help="memory cgroup of the admission check, MiB (0: skip; needs root and cgroup v1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=20.0, help="the soak stops by itself after this")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--write", type=Path, default=None, help="also write the table into this markdown file"
    )


def _prototypes(classes: list[int], seed: int, c: int = 10) -> Prototypes:
    g = torch.Generator().manual_seed(seed)
    vectors = F.normalize(torch.randn(len(classes), c, generator=g), dim=1)
    return Prototypes(vectors, torch.tensor(classes), torch.randint(1, 50, (len(classes),), generator=g))


@dataclass
class _Ledger:
    """What the server acknowledged, and what the clients saw."""

    acked: set[tuple[str, int, str]] = field(default_factory=set)  # (federation, round, client id)
    refused: dict[str, int] = field(default_factory=dict)  # error reason → count (after retries)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, fid: str, r: int, client_id: str) -> None:
        with self.lock:
            self.acked.add((fid, r, client_id))

    def refuse(self, reason: str) -> None:
        with self.lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1


class _Server:
    """One data folder, one port, a ``ktl serve`` process that can be killed and started again."""

    def __init__(self, data_dir: Path, log: Path, env: dict[str, str]) -> None:
        self.data_dir, self.log, self.env = data_dir, log, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: ServeProcess | None = None
        self.up = threading.Event()

    def start(self) -> None:
        proc = ServeProcess(self.data_dir, ADMIN, log=self.log, **self.env)
        proc.port, proc.url = self.port, self.url  # the same address across restarts
        # Up and answering is enough: a restart inside the disk-full window reports ``low_disk`` until
        # the window closes, which this loop does only after the restart returns.
        self.proc = proc.start(timeout=300, low_disk_ok=True)
        self.up.set()

    def kill(self) -> None:
        self.up.clear()
        if self.proc is not None:
            self.proc.kill9()

    def stop(self) -> None:
        self.up.clear()
        if self.proc is not None:
            self.proc.stop()


def _participant(
    server: _Server,
    fid: str,
    token: str,
    index: int,
    rounds: int,
    ledger: _Ledger,
    stop: threading.Event,
    gate: threading.Event,
) -> int:
    """Upload then wait, round after round; returns the rounds it saw published. An upload starts only
    while ``gate`` is set (the soak closes it while it fills the disk)."""
    published = 0
    with KtlHttpClient(server.url, token, timeout=30, retries=40, backoff=0.25) as sdk:
        r = 1
        while r <= rounds and not stop.is_set():
            classes = sorted({(index + k) % 10 for k in range(1 + index % 4)})
            gate.wait()
            try:
                answer = sdk.upload(fid, r, _prototypes(classes, seed=1000 * r + index))
                ledger.ack(fid, r, answer["client_id"])
            except KtlApiError as exc:
                if exc.reason in ("round_closed", "round_not_open"):  # it moved on (a deadline): follow it
                    current = int(exc.body.get("current_round", r + 1))
                    r = max(current, r + 1) if exc.reason == "round_closed" else r
                    ledger.refuse(exc.reason)
                    continue
                ledger.refuse(exc.reason)
                time.sleep(0.5)
                continue
            except httpx.HTTPError:
                ledger.refuse("transport")
                continue
            try:
                state = sdk.wait_for_round(fid, r, timeout=600, poll=0.25)
                published += state["state"] == "published"
            except (httpx.HTTPError, KtlApiError, TimeoutError):
                ledger.refuse("wait")
            r += 1
    return published


def _probe(server: _Server, stop: threading.Event, latencies: list[float], misses: list[int]) -> None:
    """``/healthz`` every 100 ms while the server is up: latency, or a miss when it does not answer."""
    with httpx.Client(timeout=5) as http:
        while not stop.wait(0.1):
            if not server.up.is_set():
                continue
            t0 = time.perf_counter()
            try:
                ok = http.get(f"{server.url}/healthz").status_code == 200
            except httpx.HTTPError:
                ok = False
            if server.up.is_set():  # a kill during the request is not the server's latency
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    misses.append(1)


def _mount_tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=10)  # fmt: skip
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def _fill(path: Path) -> Path:
    """Fill the file system of ``path`` to the last few KiB with one balloon file.

    Unbuffered writes: a buffered file would hold the last partial chunk and raise ENOSPC on close,
    outside the guard (the cause of a CI failure).
    """
    balloon = path / "balloon.bin"
    target = max(0, shutil.disk_usage(path).free - 4096)
    chunk = b"\0" * (1 << 20)
    fd = os.open(balloon, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = 0
        while written < target:
            try:  # a full disk here is the point
                n = os.write(fd, chunk[: min(len(chunk), target - written)])
            except OSError:
                break
            if n == 0:
                break
            written += n
    finally:
        os.close(fd)
    return balloon


def _timed_calls(url: str, fid: str, n: int) -> tuple[list[float], list[int]]:
    """``n`` authenticated calls (the admin reads a federation): their latencies and statuses."""
    latencies, statuses = [], []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                statuses.append(client.get(f"/v1/federations/{fid}").status_code)
            except httpx.HTTPError:
                statuses.append(0)
            latencies.append(time.perf_counter() - t0)
    return latencies, statuses


def strangers_check(server: _Server, fid: str, n: int, calls: int = 40) -> dict[str, Any]:
    """Authenticated calls without and with ``n`` slow unauthenticated bodies held open, side by side."""
    before, before_status = _timed_calls(server.url, fid, calls)
    socks: list[socket.socket] = []
    refused_at_once = 0
    try:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(
                b"POST /v1/federations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            socks.append(sock)
        during, during_status = _timed_calls(server.url, fid, calls)
        for sock in socks:
            sock.settimeout(5)
            with contextlib.suppress(OSError):
                refused_at_once += sock.recv(64).startswith(b"HTTP/1.1 401")
    finally:
        for sock in socks:
            sock.close()
    return {
        "strangers": n,
        "calls": calls,
        "ok_before": sum(200 <= s < 300 for s in before_status),
        "ok_during": sum(200 <= s < 300 for s in during_status),
        "p50_before_ms": 1e3 * statistics.median(before),
        "p50_during_ms": 1e3 * statistics.median(during),
        "max_during_ms": 1e3 * max(during),
        "strangers_told_401": refused_at_once,
    }


def admission_check(work: Path, limit_mb: int) -> dict[str, Any]:
    """A server in a memory cgroup of ``limit_mb``: a spec estimated at ~1.56 GiB (fedtgp, C = 1000,
    quorum 100) — above a quarter of 3 GiB, below a quarter of most hosts — must be refused."""
    group = memory_cgroup(limit_mb << 20, f"ktl-chaos-{os.getpid()}")
    if group is None:
        return {"memory_limit_mb": limit_mb, "measured": False}
    proc = ServeProcess(
        work / "admission-data", ADMIN, log=work / "admission.log", cgroup=group, KTL_DEVICE="cpu"
    )
    try:
        proc.start(timeout=300)
        spec = {"method": "fedtgp", "num_classes": 1000, "quorum": 100, "baseline": {"tgp_hidden_dim": 1024}}
        answer = httpx.post(
            f"{proc.url}/v1/federations", json=spec, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60
        )
        body = answer.json().get("error", {}) if answer.status_code >= 400 else {}
        return {
            "memory_limit_mb": limit_mb,
            "measured": True,
            "status": answer.status_code,
            "reason": body.get("reason"),
            "estimate_gib": (body.get("estimate_bytes") or 0) / 2**30,
            "server_limit_gib": (body.get("limit_bytes") or 0) / 2**30,
        }
    finally:
        proc.stop()
        with contextlib.suppress(OSError):
            group.rmdir()


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="ktl-chaos-"))
    mounted = args.disk_window > 0 and _mount_tmpfs(work / "fs", 512)
    data_dir = (work / "fs" if mounted else work) / "data"
    env = {
        "KTL_DEVICE": "cpu",
        "KTL_SCHEDULER_INTERVAL_S": "0.1",
        "KTL_RATE_LIMIT_PER_MINUTE": "1000000",
        "KTL_RATE_LIMIT_BURST": "100000",
        "KTL_ALIGN_SLICE_SECONDS": "0.1",
        "KTL_MIN_FREE_BYTES": str(8 << 20),
    }
    server = _Server(data_dir, work / "serve.log", env)
    server.start()
    admin = KtlHttpClient(server.url, ADMIN, retries=40)
    deadline_s = 1800.0
    healthy = [
        admin.create_federation(
            {
                "name": "healthy-fedktl",
                "num_classes": 10,
                "quorum": args.clients,
                "aligner": FAST_ALIGNER,
                "round_deadline_s": deadline_s,
            }  # fmt: skip
        ),
        admin.create_federation(
            {
                "name": "healthy-fedproto",
                "method": "fedproto",
                "num_classes": 10,
                "quorum": args.clients,
                "round_deadline_s": deadline_s,
            }  # fmt: skip
        ),
    ]
    poison = admin.create_federation(
        {
            "name": "poison",
            "num_classes": 10,
            "quorum": 1,
            "aligner": {**FAST_ALIGNER, "steps": args.poison_steps},
        }  # fmt: skip
    )
    tokens = {
        f["id"]: [admin.register_client(f["id"])["token"] for _ in range(args.clients)] for f in healthy
    }
    strangers = strangers_check(server, healthy[1]["id"], args.strangers) if args.strangers else None
    admission = admission_check(work, args.memory_limit_mb) if args.memory_limit_mb else None
    poison_token = admin.register_client(poison["id"])["token"]
    KtlHttpClient(server.url, poison_token, retries=40).upload(poison["id"], 1, _prototypes([0, 1, 2], 7))

    ledger, stop, gate = _Ledger(), threading.Event(), threading.Event()
    gate.set()
    latencies: list[float] = []
    misses: list[int] = []
    probe = threading.Thread(target=_probe, args=(server, stop, latencies, misses), daemon=True)
    probe.start()
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda f=fid, t=token, i=i: results.append(
                _participant(server, f, t, i, args.rounds, ledger, stop, gate)
            ),
            daemon=True,
        )
        for fid, ts in tokens.items()
        for i, token in enumerate(ts)
    ]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    kills = disk_windows = 0
    balloon: Path | None = None
    disk_until = 0.0
    until = t_start + 60 * args.max_minutes
    expected = 2 * args.clients * args.rounds  # acknowledgements of a complete soak
    # Failures land at fixed fractions of the soak's progress (acknowledged uploads), jittered by the seed.
    kill_at = sorted(expected * (i + rng.uniform(0.6, 1.4)) / (args.kills + 1) for i in range(args.kills))
    disk_at = expected * rng.uniform(0.3, 0.7) if mounted else None
    while any(t.is_alive() for t in threads) and time.monotonic() < until:
        done = len(ledger.acked)
        if kill_at and done >= kill_at[0]:
            kill_at.pop(0)
            logger.info("chaos: kill -9 after %d acknowledged uploads", done)
            server.kill()
            server.start()
            kills += 1
        if disk_at is not None and done >= disk_at:
            disk_at = None
            # Filling 512 MiB takes a while; uploads wait for it (otherwise a fast soak finished while the
            # balloon grew: no upload saw the full disk, and the loop ended before the kill due after it).
            gate.clear()
            try:
                balloon = _fill(data_dir.parent)
            finally:
                gate.set()
            disk_until = time.monotonic() + args.disk_window
            logger.info("chaos: disk full after %d uploads, for %.1fs", done, args.disk_window)
        # The window closes while the loop goes on watching (a blocking sleep here let the soak finish
        # inside the window and skip the kills due after it).
        if balloon is not None and time.monotonic() >= disk_until:
            balloon.unlink()
            balloon = None
            disk_windows += 1
        time.sleep(0.05)
    if balloon is not None:  # the soak ended inside the window
        balloon.unlink()
        disk_windows += 1
    while admin.round(poison["id"], 1)["state"] == "aligning" and time.monotonic() < until:
        time.sleep(0.5)  # the poison round must end too (published, or failed with a reason)
    stop.set()
    for t in threads:
        t.join(30)
    wall = time.monotonic() - t_start

    # The verdict, from the server's own records.
    lost = 0
    by_round: dict[tuple[str, int], set[str]] = {}
    for fid, r, cid in ledger.acked:
        if (fid, r) not in by_round:
            by_round[fid, r] = set(admin.round(fid, r)["clients"])
        lost += cid not in by_round[fid, r]
    healthy_states = [admin.round(f["id"], r)["state"] for f in healthy for r in range(1, args.rounds + 1)]
    poison_state = admin.round(poison["id"], 1)
    stop.clear()
    server.stop()
    kept_log = None
    if lost or healthy_states.count("published") < len(healthy_states):  # keep the evidence
        kept_log = Path(tempfile.mkstemp(prefix="ktl-chaos-serve-", suffix=".log")[1])
        shutil.copyfile(work / "serve.log", kept_log)
        logger.warning("chaos: the soak failed; the server's log is kept at %s", kept_log)
    if mounted:
        subprocess.run(["umount", str(work / "fs")], check=False, capture_output=True)
    shutil.rmtree(work, ignore_errors=True)
    lat = sorted(latencies) or [float("nan")]
    return {
        "clients": args.clients,
        "rounds": args.rounds,
        "kills": kills,
        "disk_full_windows": disk_windows,
        "acknowledged_uploads": len(ledger.acked),
        "lost_uploads": lost,
        "healthy_rounds": len(healthy_states),
        "healthy_published": healthy_states.count("published"),
        "healthy_states": {s: healthy_states.count(s) for s in set(healthy_states)},
        "poison_state": poison_state["state"],
        "poison_error": poison_state.get("error"),
        "refusals_after_retries": ledger.refused,
        "healthz_samples": len(latencies),
        "healthz_misses": len(misses),
        "healthz_p50_ms": 1e3 * statistics.median(lat),
        "healthz_p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "healthz_max_ms": 1e3 * lat[-1],
        "wall_s": wall,
        "strangers": strangers,
        "admission": admission,
        "server_log": str(kept_log) if kept_log else None,
        "machine": machine(),
    }


def _markdown(res: dict[str, Any]) -> str:
    disk = (
        f"{res['disk_full_windows']} window(s) of a full disk"
        if res["disk_full_windows"]
        else "no disk-full window (--disk-window 0, or not root: it mounts a tmpfs)"
    )
    return "\n".join(
        [
            "## Chaos soak (`ktl bench chaos`)",
            "",
            f"{res['machine']}. A real `ktl serve` on loopback; two healthy federations (fedktl, fedproto) of "
            f"{res['clients']} clients × {res['rounds']} rounds, {res['kills']} kill -9 of the server at random "
            f"moments, {disk}, and a poison FedKTL round with a long server step beside them.",
            "",
            "| what | measured |",
            "|---|---|",
            f"| acknowledged uploads | {res['acknowledged_uploads']} |",
            f"| acknowledged uploads lost | **{res['lost_uploads']}** |",
            f"| healthy rounds published | **{res['healthy_published']} / {res['healthy_rounds']}** |",
            f"| poison round | {res['poison_state']} ({res['poison_error'] or 'no error'}) |",
            f"| `/healthz` while up: p50 / p99 / max | {res['healthz_p50_ms']:.1f} / {res['healthz_p99_ms']:.1f} / "
            f"{res['healthz_max_ms']:.1f} ms ({res['healthz_samples']} probes, {res['healthz_misses']} unanswered) |",
            f"| refusals seen by clients after retries | {res['refusals_after_retries'] or 'none'} |",
            f"| wall time | {res['wall_s']:.0f} s |",
            *_checks_markdown(res),
        ]
    )


def _checks_markdown(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    s = res.get("strangers")
    if s:
        out += [
            f"| {s['strangers']} slow unauthenticated bodies: authenticated calls answered, without / with "
            f"| {s['ok_before']} / {s['ok_during']} of {s['calls']} (p50 {s['p50_before_ms']:.1f} / "
            f"{s['p50_during_ms']:.1f} ms, max with {s['max_during_ms']:.1f} ms; "
            f"{s['strangers_told_401']} strangers told 401 before their body) |",
        ]
    a = res.get("admission")
    if a and a.get("measured"):
        out.append(
            f"| a ~{a['estimate_gib']:.2f} GiB spec in a {a['memory_limit_mb']} MiB memory cgroup | {a['status']} "
            f"{a['reason']} (the server's limit: {a['server_limit_gib']:.2f} GiB per federation) |"
        )
    elif a:
        out.append(
            f"| memory-limited admission ({a['memory_limit_mb']} MiB) | not measured (needs root and cgroup v1) |"
        )
    return out


def main(args: argparse.Namespace) -> int:
    res = run(args)
    return report(res, _markdown(res), as_json=args.json, write=args.write, section="chaos")
