"""A Flower 1.42 SuperNode whose fixed sleeps are shortened: for ``ktl bench flower --engine deployment``
only, to measure what those sleeps cost a round — never for a real deployment.

Flower's SuperNode loop (`flwr.supernode.start_client_internal`) sleeps 3 s after every pull from the
SuperLink that found no message, and looks for the ClientApp's reply every 0.5 s; neither has a flag or an
environment variable. Here that module's ``time`` is swapped for one whose ``sleep`` lasts at most
``KTL_WHATIF_SLEEP`` seconds (default 0.1), then ``flower-supernode`` runs with the arguments given:
``python -m ktl.benchmarks.supernode_whatif --insecure --superlink … --node-config …``. Everything else —
the SuperExec it starts, a ``flwr-clientapp`` process per message — is Flower's own.
"""

from __future__ import annotations

import os
import sys
import time
import types

import flwr.supernode.start_client_internal as supernode_loop
from flwr.supernode.cli import flower_supernode

__all__ = ["main", "short_sleeps"]


def short_sleeps(cap: float) -> types.SimpleNamespace:
    """``time`` with ``sleep(s)`` cut to ``min(s, cap)``."""
    shim = types.SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    )
    shim.sleep = lambda seconds: time.sleep(min(seconds, cap))
    return shim


def main() -> None:
    supernode_loop.time = short_sleeps(float(os.environ.get("KTL_WHATIF_SLEEP", "0.1")))  # type: ignore[assignment]
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
