"""``ktl bench flower --engine deployment``'s breakdown: where a round's seconds go on a SuperNode, read
from its stamped log and its node worker's log (synthetic logs in Flower 1.42's and the worker's formats;
the real run is the bench itself)."""

from __future__ import annotations

import inspect
import io
import time
from datetime import datetime
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import flwr.supernode.start_client_internal as supernode_loop  # noqa: E402 - after the check above

from ktl.benchmarks import flower as bench  # noqa: E402
from ktl.benchmarks.supernode_whatif import short_sleeps  # noqa: E402

NODE = 4242


def _supernode_log(rounds: dict[int, dict[str, float]]) -> str:
    """Flower's SuperNode lines (colours stripped) as `bench._stamp` writes them, a query message first."""
    lines = [(0.0, "INFO :      Starting Flower SuperNode"), (0.1, f"INFO :      SuperNode ID: {NODE}"),
             (1.0, "INFO :      [RUN 7]"), (1.0, "INFO :      Receiving: query message (ID: q)"),
             (1.1, "INFO :      Received successfully"), (1.5, "INFO :      Start `flwr-clientapp` process"),
             (2.0, "INFO :      [RUN 7]"), (2.0, "INFO :      Sending: query message (ID: r)"),
             (2.1, "INFO :      Sent successfully")]  # fmt: skip
    for k, ev in rounds.items():
        lines += [
            (ev["recv"], f"INFO :      [RUN 7, ROUND {k}]"),
            (ev["recv"], f"INFO :      Receiving: train message (ID: m{k})"),
            (ev["got"], "INFO :      Received successfully"),
            (ev["app"], "INFO :      Start `flwr-clientapp` process"),
            (ev["app"] + 0.01, "INFO :      client 0: 1 step"),  # the app's own lines are ignored
            (ev["send"], f"INFO :      [RUN 7, ROUND {k}]"),
            (ev["send"], f"INFO :      Sending: train message (ID: s{k})"),
            (ev["sent"], "INFO :      Sent successfully"),
        ]
    base = 1_800_000_000.0
    return "".join(f"{base + t:.3f} {text}\n" for t, text in lines)


def _worker_log(trains: list[tuple[float, float]]) -> str:
    base = 1_800_000_000.0
    out = []
    for i, (start, end) in enumerate(trains):
        stamp = datetime.fromtimestamp(base + end).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        if i == 0:  # a first answer that only asked for the state is no step
            out.append(f"{stamp} INFO train message answered in 0.001 s (state asked for)\n")
        out.append(f"{stamp} INFO train message answered in {end - start:.3f} s\n")
    return "".join(out)


def test_breakdown_splits_each_cycle_into_phases_that_add_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rounds = {
        1: {"recv": 10.0, "got": 10.1, "app": 11.0, "send": 13.0, "sent": 13.2},
        2: {"recv": 16.3, "got": 16.4, "app": 17.2, "send": 19.0, "sent": 19.1},
        3: {"recv": 22.2, "got": 22.3, "app": 23.3, "send": 25.4, "sent": 25.6},
    }
    trains = [(11.5, 12.5), (17.6, 18.5), (23.8, 25.0)]
    (tmp_path / "supernode-0.log").write_text(_supernode_log(rounds))
    monkeypatch.setattr(bench, "worker_path", lambda node, i: tmp_path / f"node-{node}-p{i}.sock")
    (tmp_path / f"node-{NODE}-p0.log").write_text(_worker_log(trains))

    got = bench.breakdown(tmp_path, 1)

    assert got["samples"] == 2  # rounds 2 and 3: the first has no reply before it
    expected = {  # round 2, round 3
        "wait": (16.3 - 13.2, 22.2 - 19.1),
        "pull": (0.1, 0.1),
        "launch": (0.8, 1.0),
        "clientapp": (0.4, 0.5),
        "work": (0.9, 1.2),
        "reply": (0.5, 0.4),
        "send": (0.1, 0.2),
        "cycle": (19.1 - 13.2, 25.6 - 19.1),
    }
    for phase, (a, b) in expected.items():
        assert got[phase] == pytest.approx((a + b) / 2, abs=2e-3), phase  # ms stamps
    assert got["wait_min"] == pytest.approx(3.1, abs=2e-3)
    parts = sum(got[p] for p in ("wait", "pull", "launch", "clientapp", "work", "reply", "send"))
    assert parts == pytest.approx(got["cycle"], abs=1e-6)
    assert "run" not in got


def test_breakdown_without_a_worker_log_keeps_the_clientapp_run_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "worker_path", lambda node, i: tmp_path / f"node-{node}-p{i}.sock")
    rounds = {
        1: {"recv": 10.0, "got": 10.1, "app": 11.0, "send": 13.0, "sent": 13.2},
        2: {"recv": 16.3, "got": 16.4, "app": 17.2, "send": 21.0, "sent": 21.1},
    }
    (tmp_path / "supernode-0.log").write_text(_supernode_log(rounds))  # KTL_FLOWER_WORKER=0: no worker log
    got = bench.breakdown(tmp_path, 1)
    assert got["run"] == pytest.approx(21.0 - 17.2, abs=2e-3)
    assert "work" not in got and got["samples"] == 1


def test_stamp_prefixes_each_line_with_its_arrival_and_strips_colours(tmp_path: Path) -> None:
    before = time.time()
    bench._stamp(io.BytesIO(b"\x1b[92mINFO \x1b[0m:      Sent successfully\nplain\n"), tmp_path / "x.log")
    lines = (tmp_path / "x.log").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["INFO :      Sent successfully", "plain"]
    assert all(before - 1e-3 <= float(line.split(" ", 1)[0]) <= time.time() + 1e-3 for line in lines)


def test_the_what_if_supernode_cuts_only_the_sleeps_of_flowers_supernode_loop() -> None:
    """The premise of the bench's what-if row, checked against the installed Flower: its SuperNode loop sleeps
    3 s after a pull that found nothing, looks for replies every 0.5 s, and takes both from its module's
    ``time`` — which `short_sleeps` replaces with one whose other functions are time's own."""
    source = inspect.getsource(supernode_loop)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source
    assert supernode_loop.time is time
    shim = short_sleeps(0.01)
    t0 = time.perf_counter()
    shim.sleep(3)
    assert time.perf_counter() - t0 < 1.0  # cut to 0.01 s (generous for a loaded machine)
    assert shim.monotonic is time.monotonic and shim.time is time.time
