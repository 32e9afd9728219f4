"""``ktl bench startup``: how long the ``ktl`` command takes before it answers, in one run.

Each case runs ``--runs`` times as a fresh subprocess (the median is reported): ``ktl --help``, a mistyped
command, ``ktl list``, ``ktl simulate --help``, and — side by side, the way every call started before the
parser was built lazily — the whole parser built eagerly (every settings flag and benchmark module, which
import torch and transformers).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ktl.benchmarks.common import machine, report

__all__ = ["CASES", "add_arguments", "main", "run"]

_EAGER = "from ktl.cli import build_parser; build_parser().format_help()"
CASES: dict[str, list[str]] = {
    "ktl --help": ["-m", "ktl", "--help"],
    "ktl simulat (a mistyped command)": ["-m", "ktl", "simulat"],
    "ktl list": ["-m", "ktl", "list"],
    "ktl simulate --help": ["-m", "ktl", "simulate", "--help"],
    "every call before: the whole parser built": ["-c", _EAGER],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=5, help="runs per case (the median is reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--write", type=Path, default=None, help="also write the table into this file")


def _seconds(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], capture_output=True, check=False, timeout=600)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    _seconds(CASES["ktl --help"])  # warm the file cache once
    rows = {name: statistics.median(_seconds(cmd) for _ in range(args.runs)) for name, cmd in CASES.items()}
    return {"runs": args.runs, "median_s": rows, "machine": machine()}


def _markdown(res: dict[str, Any]) -> str:
    eager = res["median_s"]["every call before: the whole parser built"]
    lines = [
        "## `ktl` start-up (`ktl bench startup`)",
        "",
        f"{res['machine']}. Median of {res['runs']} fresh processes per case, one run.",
        "",
        "| command | median | vs building the whole parser |",
        "|---|---|---|",
    ]
    for name, seconds in res["median_s"].items():
        lines.append(f"| {name} | {seconds:.2f} s | {seconds / eager:.2f}× |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    res = run(args)
    return report(res, _markdown(res), as_json=args.json, write=args.write, section="startup")
