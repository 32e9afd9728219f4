"""``ktl bench flower``: ktl on Flower's Simulation Engine against ``ktl simulate``, in one run.

1. Overhead: the same configuration (``--preset``, ``--clients``, ``--rounds``) through ``ktl simulate`` and
   through ``ktl flower simulate``; wall time per round (each side's own ``round_seconds``, so Ray's
   start-up is reported apart) and the ratio. Accuracies are compared too (they should be equal).
2. Scale: ``--scale-clients`` virtual clients (200) with a few samples each for ``--scale-rounds`` rounds:
   time per round and the peak memory of this process and its Ray workers together.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from ktl.benchmarks.common import machine, report
from ktl.config import build_config
from ktl.flower.config import FlowerOptions
from ktl.flower.simulation import run_flower_simulation
from ktl.simulate import run_simulation

__all__ = ["main", "run"]  # its flags are declared in ktl.cli (Flower is imported only when it runs)


class _PeakMemory:
    """The largest RSS of this process and all its descendants (Ray's workers), sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.2):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a worker that just exited
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)

    def __enter__(self) -> _PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ktl-bench-flower-"))
    overrides = {"num_clients": args.clients, "rounds": args.rounds}
    t0 = time.perf_counter()
    run_simulation(
        build_config(preset=args.preset, overrides={**overrides, "out": str(work / "sim")}), progress=False
    )
    sim_wall = time.perf_counter() - t0
    sim = _rows(work / "sim" / "metrics.jsonl")
    t0 = time.perf_counter()
    flower = run_flower_simulation(
        build_config(preset=args.preset, overrides=overrides), FlowerOptions(out=str(work / "flower"))
    )
    flower_wall = time.perf_counter() - t0
    fl = _rows(work / "flower" / "metrics.jsonl")
    sim_round = statistics.mean(r["round_seconds"] for r in sim)
    fl_round = statistics.mean(r["round_seconds"] for r in fl)
    later = slice(1, None) if len(sim) > 1 else slice(None)  # round 1 includes Ray's workers warming up
    res: dict[str, Any] = {
        "preset": args.preset,
        "clients": args.clients,
        "rounds": args.rounds,
        "simulate_round_s": sim_round,
        "flower_round_s": fl_round,
        "flower_overhead": fl_round / sim_round - 1,
        "simulate_later_round_s": statistics.mean(r["round_seconds"] for r in sim[later]),
        "flower_later_round_s": statistics.mean(r["round_seconds"] for r in fl[later]),
        "threads": torch.get_num_threads(),
        "simulate_wall_s": sim_wall,
        "flower_wall_s": flower_wall,
        "same_accuracies": [r["accuracy"] for r in sim] == flower["accuracy"],
        "machine": machine(),
    }
    if args.scale_clients:
        scale = build_config(
            preset=args.preset,
            overrides={
                "num_clients": args.scale_clients,
                "rounds": args.scale_rounds,
                "data": {"partition": "dirichlet", "alpha": 1.0},
            },
        )
        with _PeakMemory() as memory:
            t0 = time.perf_counter()
            summary = run_flower_simulation(scale, FlowerOptions(out=str(work / "scale")))
            scale_wall = time.perf_counter() - t0
        rows = _rows(work / "scale" / "metrics.jsonl")
        res.update(
            scale_clients=args.scale_clients,
            scale_round_s=statistics.mean(r["round_seconds"] for r in rows),
            scale_wall_s=scale_wall,
            scale_peak_rss_gib=memory.peak / 2**30,
            scale_failures=summary["failures"],
            scale_final_accuracy=summary["final_accuracy"],
        )
    return res


def _markdown(res: dict[str, Any]) -> str:
    lines = [
        "## ktl on Flower's Simulation Engine (`ktl bench flower`)",
        "",
        f"{res['machine']}. `{res['preset']}`, {res['clients']} clients, {res['rounds']} rounds, one run; per-round "
        "times are each side's own (Ray's start-up is in the wall time only).",
        "",
        "| | per round (all) | per round (after the first) | wall |",
        "|---|---|---|---|",
        f"| `ktl simulate` | {res['simulate_round_s']:.2f} s | {res['simulate_later_round_s']:.2f} s | "
        f"{res['simulate_wall_s']:.1f} s |",
        f"| `ktl flower simulate` | {res['flower_round_s']:.2f} s | {res['flower_later_round_s']:.2f} s | "
        f"{res['flower_wall_s']:.1f} s |",
        f"| Flower's overhead | **{100 * res['flower_overhead']:+.1f} %** | "
        f"{100 * (res['flower_later_round_s'] / res['simulate_later_round_s'] - 1):+.1f} % | |",
        "",
        "Same per-round accuracies: "
        + (
            "yes."
            if res["same_accuracies"]
            else f"no — `ktl simulate` trained with {res['threads']} torch threads in one process, Ray's "
            "workers with one thread each (float reductions depend on the thread count); at the same "
            "thread count they are equal (tests/test_flower.py)."
        ),
    ]
    if "scale_clients" in res:
        lines += [
            "",
            f"Scale: {res['scale_clients']} virtual clients (Dirichlet α = 1 over the preset's data): "
            f"{res['scale_round_s']:.1f} s per round, {res['scale_wall_s']:.0f} s in all, peak memory "
            f"{res['scale_peak_rss_gib']:.2f} GiB (this process and Ray's workers), {res['scale_failures']} failed "
            f"replies, final accuracy {res['scale_final_accuracy']:.4f}.",
        ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    res = run(args)
    return report(res, _markdown(res), as_json=args.json, write=args.write, section="flower")
