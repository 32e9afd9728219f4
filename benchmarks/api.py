"""``ktl bench api``: the HTTP service under load, against a real ``ktl serve`` process on loopback.

1. Upload latency: ``--clients`` clients (100) upload their prototypes for the same round at once
   (asyncio, one open keep-alive connection each), for ``--rounds-latency`` rounds; p50/p90/p99/max of the time
   from sending an upload to its acknowledgement (durable: file fsynced, row committed). The quorum is
   all clients, so alignment runs between bursts, not during them.
2. Memory: ``--tiny-rounds`` (1000) rounds of one client with one prototype (quorum 1, 1 aligner step);
   the server process's RSS is sampled every 50 rounds. Flat means no per-round growth.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F

from ktl.api.process import ServeProcess
from ktl.benchmarks.common import machine, report
from ktl.clients.sdk import KtlHttpClient
from ktl.records import Prototypes

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=100, help="concurrent uploading clients")
    parser.add_argument("--rounds-latency", type=int, default=5, help="bursts of uploads (one per round)")
    parser.add_argument("--tiny-rounds", type=int, default=1000, help="rounds for the memory check")
    parser.add_argument("--classes", type=int, default=10, help="C = K")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--write", type=Path, default=None, help="also write the table into this markdown file"
    )


def _prototypes(c: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    k = max(1, c // 2)
    ids = torch.randperm(c, generator=g)[:k].sort().values
    vectors = F.normalize(torch.randn(k, c, generator=g), dim=1)
    return Prototypes(vectors, ids, torch.randint(1, 100, (k,), generator=g)).to_bytes(torch.float16)


class _Connection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams.

    The load generator must not be the bottleneck: on 2 cores, httpx's ``AsyncClient`` with 100 open
    connections served only ~75 trivial requests per second (the same burst on raw sockets: ~2000–3000),
    so latencies would have measured the client.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes]:
        lines = [f"{method} {path} HTTP/1.1", "Host: ktl", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _burst(
    url: str, fid: str, r: int, tokens: list[str], bodies: list[bytes]
) -> tuple[list[float], float]:
    """All uploads sent at once, each on its own already-open connection; returns the latencies and the
    seconds from the start line to the last acknowledgement."""
    host, port = url.removeprefix("http://").split(":")
    conns = [await _Connection.open(host, int(port)) for _ in tokens]
    start = asyncio.Event()

    async def one(conn: _Connection, token: str, body: bytes) -> float:
        await start.wait()
        t0 = time.perf_counter()
        status, answer = await conn.request(
            "POST",
            f"/v1/federations/{fid}/rounds/{r}/prototypes",
            {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
            body,
        )
        elapsed = time.perf_counter() - t0
        if status != 201:
            raise RuntimeError(f"upload answered {status}: {answer[:200]!r}")
        return elapsed

    tasks = [asyncio.create_task(one(c, t, b)) for c, t, b in zip(conns, tokens, bodies, strict=True)]
    await asyncio.sleep(0.05)  # every task waits at the start line
    t0 = time.perf_counter()
    start.set()
    latencies = list(await asyncio.gather(*tasks))
    seconds = time.perf_counter() - t0
    for c in conns:
        c.close()
    return latencies, seconds


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    admin_token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="ktl-bench-api-") as tmp:
        env = {
            "KTL_DEVICE": "cpu",
            "KTL_RATE_LIMIT_PER_MINUTE": "1000000",
            "KTL_RATE_LIMIT_BURST": "100000",
            "KTL_SCHEDULER_INTERVAL_S": "0.1",
        }
        with ServeProcess(Path(tmp) / "data", admin_token, **env) as server:
            proc = psutil.Process(server.pid)
            admin = KtlHttpClient(server.url, admin_token, timeout=120)
            # 1. latency under a burst of concurrent uploads
            fed = admin.create_federation(
                {"num_classes": args.classes, "quorum": args.clients, "aligner": {"steps": 20}}
            )
            fid = fed["id"]
            tokens = [admin.register_client(fid)["token"] for _ in range(args.clients)]
            latencies: list[float] = []
            burst_seconds: list[float] = []
            for r in range(1, args.rounds_latency + 1):
                bodies = [_prototypes(args.classes, 1000 * r + i) for i in range(args.clients)]
                burst, seconds = asyncio.run(_burst(server.url, fid, r, tokens, bodies))
                latencies += burst
                burst_seconds.append(seconds)
                admin.wait_for_round(fid, r, timeout=300)
                logger.info(
                    "burst %d/%d: %d uploads, p50 %.1f ms",
                    r,
                    args.rounds_latency,
                    args.clients,
                    1e3 * statistics.median(latencies[-args.clients :]),
                )
            # 2. memory over many tiny rounds
            tiny = admin.create_federation(
                {
                    "num_classes": 2,
                    "quorum": 1,
                    "aligner": {"steps": 1, "prior_samples": 8, "bandwidth_samples": 16},
                }
            )
            client = KtlHttpClient(server.url, admin.register_client(tiny["id"])["token"], timeout=60)
            one = Prototypes(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.tensor([1]))
            rss: list[tuple[int, float]] = []
            every = max(1, args.tiny_rounds // 20)  # ~20 RSS samples, the last round always among them
            t0 = time.perf_counter()
            for r in range(1, args.tiny_rounds + 1):
                client.upload(tiny["id"], r, one)
                client.wait_for_round(tiny["id"], r, timeout=60, poll=0.005)
                if r % every == 0 or r == 10 or r == args.tiny_rounds:
                    rss.append((r, proc.memory_info().rss / 2**20))
            tiny_seconds = time.perf_counter() - t0
    late = [m for r, m in rss if r >= args.tiny_rounds // 2]
    first_half = [m for r, m in rss if 10 < r < args.tiny_rounds // 2] or [rss[0][1]]
    result = {
        "machine": machine(),
        "clients": args.clients,
        "uploads": len(latencies),
        "upload_latency_ms": {
            "p50": 1e3 * _percentile(latencies, 50),
            "p90": 1e3 * _percentile(latencies, 90),
            "p99": 1e3 * _percentile(latencies, 99),
            "max": 1e3 * max(latencies),
        },
        "uploads_per_second": len(latencies) / sum(burst_seconds),
        "tiny_rounds": args.tiny_rounds,
        "tiny_round_ms": 1e3 * tiny_seconds / args.tiny_rounds,
        "rss_mib": {str(r): round(m, 1) for r, m in rss},
        "rss_growth_second_half_mib": round(max(late) - min(late), 1),
        "rss_mean_first_half_mib": round(statistics.mean(first_half), 1),
        "rss_mean_second_half_mib": round(statistics.mean(late), 1),
    }
    return result


def to_markdown(res: dict[str, Any], command: str) -> str:
    lat = res["upload_latency_ms"]
    rss = res["rss_mib"]
    keys = list(rss)
    picks = [keys[0], *keys[1:-1][:: max(1, len(keys) // 6)], keys[-1]]
    return "\n".join(
        [
            "## API: upload latency and server memory",
            "",
            f"`{command}` — {res['machine']}. Server: `ktl serve` in its own process on loopback (CPU).",
            "",
            f"**Upload latency**, {res['clients']} clients uploading at once (asyncio, one open keep-alive connection "
            f"each), {res['uploads']} uploads in all; from sending the request to the acknowledgement (file fsynced, "
            "SQLite row committed). All uploads of a burst arrive together, so the spread is mostly queueing: "
            "the last one waits for the 99 before it.",
            "",
            "| p50 | p90 | p99 | max | uploads/s in a burst |",
            "|---|---|---|---|---|",
            f"| {lat['p50']:.1f} ms | {lat['p90']:.1f} ms | {lat['p99']:.1f} ms | {lat['max']:.1f} ms | {res['uploads_per_second']:.0f} |",
            "",
            f"**Server RSS over {res['tiny_rounds']} tiny rounds** (one upload, one aligner step, publish; "
            f"{res['tiny_round_ms']:.0f} ms per round end to end):",
            "",
            "| after round | " + " | ".join(picks) + " |",
            "|---|" + "---|" * len(picks),
            "| RSS (MiB) | " + " | ".join(f"{rss[k]:.1f}" for k in picks) + " |",
            "",
            f"Mean RSS {res['rss_mean_first_half_mib']} MiB in the first half, {res['rss_mean_second_half_mib']} MiB in "
            f"the second; spread over the second half {res['rss_growth_second_half_mib']} MiB.",
        ]
    )


def main(args: argparse.Namespace) -> int:
    res = run(args)
    command = f"ktl bench api --clients {args.clients} --rounds-latency {args.rounds_latency} --tiny-rounds {args.tiny_rounds}"
    markdown = to_markdown(res, command)
    return report(res, markdown, as_json=args.json, write=args.write, section="api")
