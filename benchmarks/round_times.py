"""Each round's time and phases of a run folder, as a table: ``python benchmarks/round_times.py RUN``.

Reads ``RUN/metrics.jsonl`` (one line per finished round, so a run stopped at its limit still shows the
rounds it finished) and ``RUN/summary.json`` when the run ended. Used by ``run_gpu.sh --steps gpu-round``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ktl.benchmarks.common import run_metrics

COLUMNS = ("round_seconds", "train_seconds", "align_seconds", "synthesize_seconds", "quality_seconds")


def _cell(value: object) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def table(run: Path) -> str:
    lines = [
        "| round | "
        + " | ".join(c.removesuffix("_seconds") + " (s)" for c in COLUMNS)
        + " | accuracy | global |"
    ]
    lines.append("|" + "---|" * (len(COLUMNS) + 3))
    for m in run_metrics(run) if (run / "metrics.jsonl").exists() else []:
        cells = [str(m["round"]), *(_cell(m.get(c)) for c in COLUMNS)]
        cells += [_cell(m.get("accuracy")), _cell(m.get("global_accuracy"))]
        lines.append("| " + " | ".join(cells) + " |")
    summary = run / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        keys = ("method", "preset", "device", "rounds_run", "num_clients", "models", "data")
        lines.append("")
        lines.append(", ".join(f"{k}: {s.get(k)}" for k in keys))
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
