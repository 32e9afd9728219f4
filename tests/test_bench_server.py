"""`ktl bench server` runs end to end on a tiny case and reports what it promises (no timing asserted)."""

import json

import pytest

from ktl.cli import main


def test_bench_server_json_has_timings_ratios_and_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "-q",
            "bench",
            "server",
            "--device",
            "cpu",
            "--cases",
            "4x3",
            "--epochs",
            "2",
            "--jobs",
            "16",
            "--batch-sizes",
            "4,8",
            "--json",
        ]
    )
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    (case,) = res["cases"]
    assert case["classes"] == 4 and case["clients"] == 3 and case["uploads"] == 12
    for key in ("reference", "reference_scaled_kernel", "ours_default"):
        assert case[key]["seconds"] > 0 and case[key]["loss"] == case[key]["loss"]  # finite, not NaN
    assert case["speedup_default_round"] > 0
    if case["ours_to_target"] is not None:  # reached: its loss is at most the target
        assert case["ours_to_target"]["loss"] <= case["target_loss"]
        assert case["speedup_to_target"] > 0
    assert [r["batch_size"] for r in res["throughput"]] == [4, 8]
    assert all(r["job_images_per_s"] > 0 and r["bare_images_per_s"] > 0 for r in res["throughput"])
    assert res["job_vs_bare_at_best"] > 0
    assert res["peak_gpu_memory_mib"] is None and res["peak_rss_mib"] > 0


def test_bench_api_json_on_a_tiny_load(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["-q", "bench", "api", "--clients", "4", "--rounds-latency", "1", "--tiny-rounds", "3", "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["uploads"] == 4 and res["upload_latency_ms"]["p50"] > 0
    assert list(res["rss_mib"]) == ["1", "2", "3"] and res["tiny_rounds"] == 3
