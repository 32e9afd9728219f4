"""`ktl bench startup` runs every case as a fresh process and reports a median for each (its figures are in
docs/benchmarks.md; no timing is asserted here)."""

import json

import pytest

from ktl.benchmarks.startup import CASES
from ktl.cli import main


@pytest.mark.slow  # make test-all (make test keeps the server and chaos benchmarks)
def test_the_startup_benchmark_reports_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "bench", "startup", "--runs", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["median_s"]) == set(CASES) and all(s > 0 for s in res["median_s"].values())
