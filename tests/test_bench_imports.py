"""`ktl bench NAME` imports benchmark NAME alone: the GPU image lacks some packages (the server's), so a
benchmark must not die on another one's imports."""

import json
import subprocess
import sys

# In a fresh interpreter: build the parser `ktl bench server` / `ktl bench generate` builds, then report
# which benchmark modules and server packages got imported.
_PROBE = """
import json, sys
from ktl.cli import build_parser
build_parser(sys.argv[1:])
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("ktl.benchmarks.", "ktl.api", "fastapi")))))
"""


def _imported(*argv: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=300, check=True
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_ktl_bench_x_imports_only_bench_x() -> None:
    server = _imported("-q", "bench", "server", "--device", "cpu")
    assert {"ktl.benchmarks.server", "ktl.benchmarks.reference_round"} <= server
    assert not {"ktl.benchmarks.generate", "ktl.benchmarks.api", "ktl.benchmarks.chaos"} & server
    # the server bench reaches the HTTP service only when its throughput part runs, not at import
    assert not any(m.startswith(("ktl.api", "fastapi")) for m in server), server

    generate = _imported("bench", "generate", "--help")
    assert "ktl.benchmarks.generate" in generate
    assert not {"ktl.benchmarks.server", "ktl.benchmarks.api", "ktl.benchmarks.accuracy"} & generate
