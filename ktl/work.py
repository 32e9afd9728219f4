"""Resumable work: a long computation written as a generator that yields between its steps.

A server step (FedKTL's alignment, FedTGP's prototype training) yields after every optimisation step;
whoever drives it decides how long a slice is. ``ktl simulate`` runs it to the end at once
(`run_to_end`); the server runs a slice at a time on its device worker, round-robin with the other
federations' work, and can stop it between slices (a time budget, a cancelled round, SIGTERM). The
computation is the same either way, so the numbers are too. Dependency-free, so leaves may use it.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

__all__ = ["Work", "run_to_end"]

T = TypeVar("T")

Work = Generator[None, None, T]
"""Work that yields ``None`` between steps and returns its result."""


def run_to_end(work: Work[T]) -> T:
    """Drive ``work`` to its end and return its result."""
    while True:
        try:
            next(work)
        except StopIteration as stop:
            return stop.value
