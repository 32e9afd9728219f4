"""``ktl bench secagg``: what secure aggregation costs on Flower, in one run on one machine.

For fedproto, fedproto-secagg, fedktl and fedktl-secagg, the same configuration (``--preset``,
``--clients``, ``--rounds``, seed) on Flower's Simulation Engine: wall time per round (after the first,
which carries Ray's warm-up), the bytes on the wire per client per round both ways (Flower's protobuf
encoding of every message's content, counted by the ServerApp: SecAgg+'s four exchanges included), and the
final accuracy. The accuracy over seeds is ``ktl bench accuracy --suite secagg`` (docs/results.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from ktl.benchmarks.common import machine, report, run_metrics
from ktl.config import build_config
from ktl.flower.config import FlowerOptions
from ktl.flower.simulation import run_flower_simulation

__all__ = ["METHODS", "main", "run"]  # flags are declared in ktl.cli (Flower is imported only when it runs)

METHODS = ("fedproto", "fedproto-secagg", "fedktl", "fedktl-secagg")


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ktl-bench-secagg-"))
    rows = []
    for method in METHODS:
        config = build_config(
            preset=args.preset,
            overrides={"method": method, "num_clients": args.clients, "rounds": args.rounds},
        )
        out = work / method
        summary = run_flower_simulation(config, FlowerOptions(out=str(out)))
        lines = run_metrics(out)
        later = lines[1:] or lines
        wire = summary["transport"]
        rows.append(
            {
                "method": method,
                "round_s": statistics.mean(r["round_seconds"] for r in later),
                "first_round_s": lines[0]["round_seconds"],
                # Per client and round over the whole run (Flower's totals; round 1 has no broadcast to send).
                "sent_per_client": wire["bytes_sent"] / (len(lines) * args.clients),
                "received_per_client": wire["bytes_received"] / (len(lines) * args.clients),
                "messages_per_client": 4 if method.endswith("-secagg") else 1,
                "final_accuracy": summary["final_accuracy"],
                "failures": summary["failures"],
            }
        )
    return {
        "preset": args.preset,
        "clients": args.clients,
        "rounds": args.rounds,
        "rows": rows,
        "machine": machine(),
    }


def _markdown(res: dict[str, Any]) -> str:
    plain = {r["method"]: r for r in res["rows"]}
    lines = [
        "### What secure aggregation costs on Flower (`ktl bench secagg`)",
        "",
        f"{res['machine']}. `{res['preset']}`, {res['clients']} clients, {res['rounds']} rounds, Flower's "
        "Simulation Engine, one run. Bytes: Flower's encoding of every message's content per client and round "
        "(averaged over every round; round 1 sends no broadcast), each way; time: per round after the first (Ray warms up in round 1).",
        "",
        "| method | exchanges / round | server → client | client → server | time / round | vs plain | "
        "final accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        base = plain.get(r["method"].removesuffix("-secagg"), r)
        lines.append(
            f"| `{r['method']}` | {r['messages_per_client']} | {r['sent_per_client'] / 1024:.1f} KiB | "
            f"{r['received_per_client'] / 1024:.1f} KiB | {r['round_s']:.2f} s | "
            f"{r['round_s'] / base['round_s']:.2f}× | {r['final_accuracy']:.4f} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    res = run(args)
    return report(res, _markdown(res), as_json=args.json, write=args.write, section="secagg-cost")
