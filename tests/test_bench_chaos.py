"""`ktl bench chaos` on a tiny soak: a kill -9 mid-soak, a full-disk window where the machine allows a
tmpfs (root), a poison round beside; nothing acknowledged is lost and every healthy round publishes."""

import json
import os

import pytest

from ktl.cli import main


def test_a_tiny_chaos_soak_loses_nothing_and_publishes_every_healthy_round(
    capsys: pytest.CaptureFixture[str],
) -> None:
    disk = "2" if os.geteuid() == 0 else "0"  # the disk-full window mounts a tmpfs
    args = ["-q", "bench", "chaos", "--clients", "3", "--rounds", "4", "--kills", "1", "--disk-window", disk]
    # 20 slow unauthenticated bodies; the memory-cgroup admission check costs a second server: off here
    # (tests/api/test_admission_memory.py checks the limit with fake cgroup files).
    checks = ["--strangers", "20", "--memory-limit-mb", "0"]
    assert main([*args, *checks, "--poison-steps", "3000", "--max-minutes", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kills"] == 1 and res["acknowledged_uploads"] >= 2 * 3 * 4, res
    assert res["lost_uploads"] == 0
    assert res["healthy_published"] == res["healthy_rounds"] == 8
    assert res["poison_state"] in ("published", "failed")  # it ended: never re-run forever
    assert res["healthz_samples"] > 0 and res["healthz_p99_ms"] >= res["healthz_p50_ms"] > 0
    strangers = res["strangers"]  # issue 23: slow bodies without a token cost authenticated calls nothing
    assert strangers["ok_during"] == strangers["ok_before"] == strangers["calls"]
    assert strangers["strangers_told_401"] == 20 and res["admission"] is None
