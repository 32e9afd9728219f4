"""Shared benchmark helpers: machine facts and docs/benchmarks.md sections."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from ktl.host import describe, host_facts, versions

__all__ = ["machine", "report", "run_metrics", "write_section"]


def machine() -> str:
    """This machine and its software, as one line (`ktl.host.describe`)."""
    return describe(host_facts(), versions())


def run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run folder's ``metrics.jsonl``: one dict per finished round, in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def write_section(path: Path, name: str, markdown: str) -> None:
    """Replace (or append) the block between ``<!-- bench:NAME -->`` markers in ``path``."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    path.write_text(text)


def report(res: dict[str, Any], markdown: str, *, as_json: bool, write: Path | None, section: str) -> int:
    """A benchmark's output: one JSON object or the markdown table on stdout; the table also into
    ``write``'s ``section`` when given."""
    sys.stdout.write((json.dumps(res) if as_json else markdown) + "\n")
    if write is not None:
        write_section(write, section, markdown)
    return 0
