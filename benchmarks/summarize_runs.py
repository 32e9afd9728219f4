"""Summarise run folders (each with summary.json) as a markdown table: mean ± std over seeds per variant.

A run folder is named ``VARIANT-sSEED`` (e.g. ``fedktl-s0``, ``fedktl-ppc5-s1``); runs group by VARIANT.

Usage: python benchmarks/summarize_runs.py RUNS_DIR
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def mean_std(values: list[float], scale: float = 1.0) -> str:
    values = [v * scale for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def main(root: Path) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(root.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        variant = re.sub(r"-s\d+$", "", path.parent.name)
        groups[variant].append(summary)
    if not groups:
        raise SystemExit(f"no */summary.json under {root}")
    rows = [
        "| variant | seeds | final accuracy (%) | best accuracy (%) | up B/client/round | down B/client/round | wall time (s) | generator |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in sorted(groups.items()):
        seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        rows.append(
            f"| {method} | {seeds} | {mean_std([r['final_accuracy'] for r in runs], 100)} "
            f"| {mean_std([r['best_accuracy'] for r in runs], 100)} "
            f"| {statistics.mean(r['bytes_up_per_client_round'] for r in runs):.0f} "
            f"| {statistics.mean(r['bytes_down_per_client_round'] for r in runs):.0f} "
            f"| {mean_std([r['wall_time_s'] for r in runs])} "
            f"| {runs[0].get('generator', '—')} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cpu-small")))
