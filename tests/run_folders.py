"""What makes two run folders "the same" whichever transport wrote them (docs/run-folder.md): the same
files, the same metrics.jsonl keys with the same types, the same summary.json and config.json keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ktl.demo import SERVER_FOLDER
from ktl.study import CLIENT_WEIGHTS


def rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def shape(folder: Path, *, clients: bool = True) -> dict[str, Any]:
    """The files (the demo server's own folder aside; client weights only with ``clients``), each metrics
    line's keys and value types, and the keys of summary.json and config.json."""
    skip = {SERVER_FOLDER} | (set() if clients else {CLIENT_WEIGHTS})
    files = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).parts[0] not in skip
    )
    types = [{k: type(v).__name__ for k, v in row.items()} for row in rows(folder)]
    summary = json.loads((folder / "summary.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    return {"files": files, "metrics": types, "summary": sorted(summary), "config": sorted(config)}


def assert_same_run_folders(a: Path, b: Path, *, clients: bool = True) -> None:
    """Same shape (`shape`) and the same per-round accuracies."""
    sa, sb = shape(a, clients=clients), shape(b, clients=clients)
    for part in sa:
        assert sa[part] == sb[part], (part, sa[part], sb[part])
    assert [r["accuracy"] for r in rows(a)] == [r["accuracy"] for r in rows(b)]
    assert [r["client_accuracy"] for r in rows(a)] == [r["client_accuracy"] for r in rows(b)]
