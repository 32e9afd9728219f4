"""How many JSON uploads are parsed at once (a JSON upload costs tens of bytes per number while it is
converted): a bound of the rounds service, transport-free (`UnavailableError` is the HTTP layer's 503)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ktl.errors import UnavailableError

__all__ = ["JSON_PARSE_SLOTS", "JSON_PARSE_WAIT_S", "parse_json_bounded"]

JSON_PARSE_SLOTS = 2
"""JSON uploads parsed at once. A 1 MiB body of ``[0,0,…],`` rows is ~350 k numbers, ~25 MB of Python
objects and parser buffers while it is converted."""
JSON_PARSE_WAIT_S = 5.0
"""How long a JSON upload waits for a slot (on a worker thread) before it is answered 503 ``busy``: a
1 MiB upload parses in 30–100 ms (2 cores), so ~50–150 queued uploads pass."""

T = TypeVar("T")

_json_slots = threading.BoundedSemaphore(JSON_PARSE_SLOTS)
_json_pool = ThreadPoolExecutor(max_workers=JSON_PARSE_SLOTS, thread_name_prefix="ktl-json")


def parse_json_bounded(parse: Callable[[], T], wait_s: float | None = None) -> T:
    """``parse()`` on one of `JSON_PARSE_SLOTS` threads; `UnavailableError` (503 ``busy``, Retry-After)
    when no slot frees up within ``wait_s`` (default `JSON_PARSE_WAIT_S`).

    A bounded wait rather than an outright 503: the burst of uploads at a round's start passes after a
    short wait instead of a retry, while a request thread (the pool also serves the sync routes) is held
    at most ``wait_s``; beyond it the SDK retries the 503 after its Retry-After. The parse runs on its
    own threads, not the caller's: the parser's buffers come from the allocator's per-thread arenas,
    which keep their peak (12 concurrent 1 MiB uploads converted on 12 threads kept ~95 MB, on these 2
    ~20 MB).
    """
    if not _json_slots.acquire(timeout=JSON_PARSE_WAIT_S if wait_s is None else wait_s):
        raise UnavailableError(
            "busy",
            f"{JSON_PARSE_SLOTS} JSON uploads are being parsed; retry, or send safetensors",
            headers={"Retry-After": "1"},
        )
    try:
        return _json_pool.submit(parse).result()
    finally:
        _json_slots.release()
