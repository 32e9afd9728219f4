"""benchmarks/round_times.py: a run folder's rounds as a table, also for a run stopped before its summary."""

import json
from pathlib import Path

from ktl.benchmarks.round_times import table


def test_round_times_lists_each_finished_round_and_the_summary_when_present(tmp_path: Path) -> None:
    rounds = [
        {"round": 1, "round_seconds": 41.5, "train_seconds": 36.3, "align_seconds": 1.3, "accuracy": 0.86},
        {"round": 2, "round_seconds": 59.4, "train_seconds": 57.1, "global_accuracy": 0.22, "accuracy": 0.89},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    lines = table(tmp_path).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 1 | 41.50 | 36.30 | 1.30 | - | - | 0.86 | - |")
    assert lines[3].endswith("| 0.89 | 0.22 |")
    (tmp_path / "summary.json").write_text(
        json.dumps({"method": "fedktl", "device": "cuda", "rounds_run": 2})
    )
    assert "method: fedktl" in table(tmp_path) and "device: cuda" in table(tmp_path)
