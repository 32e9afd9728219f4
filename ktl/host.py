"""The machine a run ran on.

Every run's ``summary.json`` records it (``host``, beside ``versions``), so a table built from runs made on
several machines says which, instead of naming the machine that happened to write it: float results
differ between CPUs (AVX2 or AVX-512 kernels) and thread counts (docs/architecture.md, Seeds and
determinism), and wall times are only comparable on one machine.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import ktl

__all__ = ["describe", "host_facts", "versions"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def host_facts() -> dict[str, Any]:
    """CPU model, cores, torch's thread count and CPU kernel level, and the GPU torch can see (or None)."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def versions() -> dict[str, str]:
    return {"ktl": ktl.__version__, "torch": torch.__version__, "python": platform.python_version()}


def describe(host: Mapping[str, Any] | None, software: Mapping[str, str] | None) -> str:
    """One line for a table, from a summary's ``host`` and ``versions``: ``"AMD EPYC 7B13, 2 cores (1 thread,
    AVX2), no GPU; Python 3.11.7, torch 2.13.0+cpu"``. A run from before summaries kept the host says so,
    with the versions it did keep."""
    soft = f"Python {software.get('python', '?')}, torch {software.get('torch', '?')}" if software else ""
    if not host:
        return f"a machine not recorded ({soft})" if soft else "a machine not recorded"
    threads = host.get("threads")
    detail = [f"{threads} thread{'' if threads == 1 else 's'}"] if threads else []
    detail += [host["cpu_capability"]] if host.get("cpu_capability") else []
    line = f"{host.get('cpu', 'unknown CPU')}, {host.get('cores', '?')} cores"
    line += f" ({', '.join(detail)})" if detail else ""
    line += f", {host.get('gpu') or 'no GPU'}"
    return f"{line}; {soft}" if soft else line
