"""ktl bench accuracy: a tiny suite end to end (runs, resume, table, plots) and its merge rules."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ktl.benchmarks import accuracy
from ktl.cli import build_parser
from ktl.config import build_config
from ktl.methods import available_methods


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(
        ["bench", "accuracy", "--runs", str(tmp_path / "runs"), "--seeds", "0,1", *extra]
    )


def test_overrides_merge_profile_scenario_variant_and_seed(tmp_path: Path) -> None:
    suite = accuracy.SUITES["ablations"]
    variant = next(v for v in suite.variants if v.name == "pairs-5-kept-5")
    args = _args(tmp_path)
    data = accuracy.run_overrides("cpu", suite.scenarios[0], variant, 2, tmp_path / "x", args)
    assert data["rounds"] == 15 and data["seed"] == 2 and data["method"] == "fedktl"
    assert data["data"] == {"partition": "dirichlet", "alpha": 0.1, "fraction": 0.1, "global_test_size": 1000}
    assert data["fedktl"] == {"pairs_per_class": 5} and data["client"] == {"pairs_memory": 5}
    all_data = next(s for s in accuracy.SUITES["main"].scenarios if s.name == "dir-all")
    cpu = accuracy.run_overrides("cpu", all_data, suite.variants[0], 0, tmp_path, args)
    gpu = accuracy.run_overrides("gpu", all_data, suite.variants[0], 0, tmp_path, args)
    assert cpu["data"]["fraction"] == 0.25 and gpu["data"]["fraction"] == 1.0


def test_unknown_variant_is_one_readable_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown variant 'fedavg'"):
        accuracy.run_suite(_args(tmp_path, "--variants", "fedavg"))


def test_tiny_suite_runs_resumes_and_writes_table_and_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the smoke preset (synthetic data, 4 clients) with one round stands in for the cpu profile
    monkeypatch.setitem(
        accuracy.PROFILES,
        "cpu",
        ("smoke", {"rounds": 2, "aligner": {"steps": 10}, "data": {"global_test_size": 200}}),
    )
    results = tmp_path / "docs" / "results.md"
    results.parent.mkdir()
    results.write_text("# Results\n\nkept text\n")
    args = _args(
        tmp_path, "--scenarios", "dir-lowdata", "--variants", "local,fedproto,fedktl", "--write", str(results)
    )
    assert accuracy.main(args) == 0
    root = tmp_path / "runs" / "main-cpu" / "dir-lowdata"
    assert sorted(p.name for p in root.iterdir()) == [
        "fedktl-s0",
        "fedktl-s1",
        "fedproto-s0",
        "fedproto-s1",
        "local-s0",
        "local-s1",
    ]
    table = capsys.readouterr().out
    assert "| local |" in table and "| fedktl |" in table and "FedKTL vs the best baseline" in table
    assert "global test set, mean of last 3 rounds (%)" in table
    assert "--seeds 0,1 --last-k 3 --scenarios dir-lowdata --variants local,fedproto,fedktl`" in table
    # every round of the last 3 was scored on the held-out set: a mean client accuracy in [0, 1]
    for run in root.iterdir():
        scored = [
            json.loads(line)["global_accuracy"] for line in (run / "metrics.jsonl").read_text().splitlines()
        ]
        assert len(scored) == 2 and all(0 <= a <= 1 for a in scored)
    text = results.read_text()
    assert "kept text" in text and "<!-- bench:accuracy-main-cpu:start -->" in text
    png = tmp_path / "docs" / "images" / "accuracy-main-cpu-dir-lowdata.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second call finds every run done and only rebuilds the table
    stamp = (root / "local-s0" / "summary.json").stat().st_mtime_ns
    args_json = _args(
        tmp_path,
        "--scenarios",
        "dir-lowdata",
        "--variants",
        "local,fedproto,fedtgp,fd,fedktl",
        "--json",
        "--summarize-only",
    )
    accuracy.main(args_json)
    res = json.loads(capsys.readouterr().out)
    assert (root / "local-s0" / "summary.json").stat().st_mtime_ns == stamp
    rows = {r["variant"]: r for r in res["scenarios"][0]["rows"]}
    assert set(rows) == {"local", "fedproto", "fedktl"}  # variants without runs are left out
    assert rows["local"]["bytes_up"] == 0 and rows["fedktl"]["bytes_up"] > 0
    assert rows["fedktl"]["seeds"] == [0, 1] and len(rows["fedktl"]["curve"]) == 2
    assert rows["fedktl"]["global_seeds"] == [0, 1] and 0 <= rows["fedktl"]["global_last_k"][0] <= 100
    assert all(0 <= r["last"][0] <= 100 for r in rows.values())
    # another suite with an identical run (same resolved config) copies it instead of running it again
    accuracy.run_suite(_args(tmp_path, "--suite", "privacy", "--variants", "local"))
    copied = tmp_path / "runs" / "privacy-cpu" / "dir-lowdata" / "local-s1"
    assert (copied / "reused_from.txt").read_text().strip() == str(root / "local-s1")
    assert (copied / "summary.json").read_text() == (root / "local-s1" / "summary.json").read_text()


def _row(variant: str, seeds: list[int], last: float) -> dict[str, object]:
    return {
        "variant": variant,
        "method": variant,
        "seeds": seeds,
        "last": (last, 1.0 if len(seeds) > 1 else 0.0),
        "best": (last + 1, 0.5 if len(seeds) > 1 else 0.0),
        "bytes_up": 345.0,
        "bytes_down": 0.0,
        "wall_s": 10.0,
        "curve": [(last, 0.0)],
        "num_clients": 20,
        "rounds": 15,
        "device": "cpu",
    }


def test_table_shows_each_rows_seeds_and_judges_only_three_seed_rows() -> None:
    suite = accuracy.SUITES["main"]

    def table(rows: list[dict[str, object]]) -> str:
        res = {"profile": "cpu", "machine": "m", "scenarios": [{"name": "x", "title": "X", "rows": rows}]}
        return accuracy.to_markdown(res, suite, "cmd", {})

    partial = table([_row("local", [0, 1, 2], 90.0), _row("fedktl", [0], 93.0)])
    assert "seeds 0,1,2." in partial and "| fedktl | 0 | 93.00 (one seed) |" in partial
    assert "| local | 0,1,2 | 90.00 ± 1.00 |" in partial
    assert "too few to judge" in partial and "meets" not in partial
    full = table([_row("local", [0, 1, 2], 90.0), _row("fedktl", [0, 1, 2], 91.0)])
    assert "**+1.00 points** (does not meet the +2-point target)" in full
    assert "(meets the +2-point target)" in table(
        [_row("local", [0, 1, 2], 90.0), _row("fedktl", [0, 1, 2], 92.5)]
    )


def test_summarize_keeps_a_variant_apart_from_one_whose_name_extends_it(tmp_path: Path) -> None:
    """``fedproto-s*`` also matches ``fedproto-secagg-s0``: each run counts for its own variant only."""
    suite = accuracy.SUITES["secagg"]
    for name, final in (("fedproto", 0.9), ("fedproto-secagg", 0.5)):
        run = tmp_path / "dir-lowdata" / f"{name}-s0"
        run.mkdir(parents=True)
        summary = {"method": name, "seed": 0, "final_accuracy": final, "best_accuracy": final,
                   "bytes_up_per_client_round": 1, "bytes_down_per_client_round": 1, "wall_time_s": 1.0,
                   "num_clients": 20, "rounds": 1, "device": "cpu", "data": "synthetic"}  # fmt: skip
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "metrics.jsonl").write_text(json.dumps({"accuracy": final}) + "\n")
    rows = {r["variant"]: r for r in accuracy.summarize(tmp_path, suite)["scenarios"][0]["rows"]}
    assert rows["fedproto"]["seeds"] == [0] and rows["fedproto"]["last"] == (90.0, 0.0)
    assert rows["fedproto-secagg"]["last"] == (50.0, 0.0)


def test_t_quantiles_match_the_tables_and_approach_the_normal() -> None:
    assert accuracy.t_quantile_975(1) == 12.706 and accuracy.t_quantile_975(4) == 2.776
    assert (
        abs(accuracy.t_quantile_975(31) - 2.0395) < 1e-3 and abs(accuracy.t_quantile_975(120) - 1.9799) < 1e-3
    )
    assert accuracy.t_quantile_975(10_000) == pytest.approx(1.96, abs=1e-3)
    with pytest.raises(ValueError):
        accuracy.t_quantile_975(0)


def test_paired_difference_is_a_t_interval_over_the_shared_seeds() -> None:
    ref = {0: 80.0, 1: 85.0, 2: 90.0, 3: 70.0, 4: 75.0, 9: 99.0}
    # differences 1, 2, 3, 1, 3 on seeds 0–4 (seed 9 has no pair, seed 7 no reference)
    better = {0: 81.0, 1: 87.0, 2: 93.0, 3: 71.0, 4: 78.0, 7: 0.0}
    pair = accuracy.paired_difference(better, ref)
    assert pair is not None and pair["seeds"] == [0, 1, 2, 3, 4] and pair["mean"] == pytest.approx(2.0)
    half = 2.776 * 1.0 / 5**0.5  # t(4) · sd(1, 2, 3, 1, 3) / √5, sd = 1
    assert pair["ci95"] == pytest.approx((2.0 - half, 2.0 + half)) and pair["significant"]
    # the same mean with a large seed-to-seed scatter is not significant: the interval contains 0
    noisy = {s: ref[s] + d for s, d in zip(range(5), (8.0, -4.0, 6.0, -3.0, 3.0), strict=True)}
    loose = accuracy.paired_difference(noisy, ref)
    assert loose is not None and loose["mean"] == pytest.approx(2.0) and not loose["significant"]
    assert loose["ci95"][0] < 0 < loose["ci95"][1]
    one = accuracy.paired_difference({0: 81.0}, ref)
    assert one is not None and one["ci95"] is None and not one["significant"]
    assert accuracy.paired_difference({5: 1.0}, ref) is None


def _fake_run(
    root: Path,
    variant: str,
    seed: int,
    curve: list[float],
    scored: list[float | None] | None = None,
    **recorded: object,
) -> None:
    run = root / "dir-lowdata" / f"{variant}-s{seed}"
    run.mkdir(parents=True)
    summary = {"method": variant, "seed": seed, "final_accuracy": curve[-1], "best_accuracy": max(curve),
               "bytes_up_per_client_round": 1, "bytes_down_per_client_round": 1, "wall_time_s": 1.0,
               "num_clients": 4, "rounds": len(curve), "device": "cpu", "data": "synthetic", **recorded}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    rows = [{"accuracy": a} if scored is None else {"accuracy": a, "global_accuracy": g}
            for a, g in zip(curve, scored or curve, strict=True)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _local_fedktl_fd() -> accuracy.Suite:
    """A suite of local (the reference), fedktl and fd on the low-data scenario, for fake runs."""
    return accuracy.Suite(
        "t",
        "T",
        (accuracy.SUITES["main"].scenarios[0],),
        (accuracy.Variant("local", {}), accuracy.Variant("fedktl", {}), accuracy.Variant("fd", {})),
        reference="local",
    )


def test_summary_reports_last_k_means_and_paired_differences_with_their_significance(tmp_path: Path) -> None:
    suite = _local_fedktl_fd()
    for seed in range(5):
        base = 0.5 + 0.05 * seed  # seed-to-seed scatter far larger than fedktl's gain: pairing removes it
        _fake_run(tmp_path, "local", seed, [base - 0.1, base, base + 0.01, base - 0.01])
        _fake_run(
            tmp_path, "fedktl", seed, [base - 0.1, base + 0.02, base + 0.03, base + 0.01 + 0.001 * seed]
        )
        _fake_run(tmp_path, "fd", seed, [base, base, base, base + (0.02 if seed % 2 else -0.02)])
    res = accuracy.summarize(tmp_path, suite, last_k=3)
    sc = res["scenarios"][0]
    rows = {r["variant"]: r for r in sc["rows"]}
    # local's last-3 mean per seed: base + (0 + 0.01 − 0.01)/3 = base
    assert rows["local"]["per_seed"][2]["last_k"] == pytest.approx(60.0)
    assert rows["local"]["last_k"][0] == pytest.approx(60.0) and rows["local"]["k"] == 3
    fedktl = sc["paired"]["fedktl"]
    assert fedktl["last_k"]["mean"] == pytest.approx(100 * (0.02 + 0.03 + 0.01) / 3 + 0.1 * 2 / 3, rel=1e-6)
    assert fedktl["last_k"]["significant"] and fedktl["last"]["significant"]
    assert not sc["paired"]["fd"]["last"]["significant"]  # ±2 points by seed: the interval contains 0
    table = accuracy.to_markdown({**res, "profile": "cpu", "machine": "m", "last_k": 3}, suite, "cmd", {})
    assert "mean of last 3 rounds (%)" in table and "Δ last-3 vs local, paired, 95 % CI" in table
    assert "significant: fedktl (+" in table and "not significant (interval contains 0): fd" in table
    assert "]*" in table.split("| fedktl |")[1].splitlines()[0]  # the significant CI is starred


def test_the_main_table_compares_every_method_and_the_htfe8_profile_selects_the_family() -> None:
    variants = {v.overrides["method"] for v in accuracy.SUITES["main"].variants}
    # every method but the ablation (fedktl-latents) and the secure-sum twins (the secagg suite's)
    assert variants == {m for m in available_methods() if m != "fedktl-latents" and not m.endswith("-secagg")}
    preset, overrides = accuracy.PROFILES["gpu-htfe8"]
    config = build_config(preset=preset, overrides=overrides)
    assert config.models[1:3] == ["googlenet", "mobilenetv2-1.0"] and len(config.models) == 8
    assert config.data.fraction == 1.0 and config.data.dataset == "fashion-mnist"


def test_the_global_test_set_gets_its_last_k_mean_paired_interval_and_sentence(tmp_path: Path) -> None:
    suite = _local_fedktl_fd()
    for seed in range(4):
        base = 0.3 + 0.05 * seed  # the same seed-to-seed scatter for everyone: pairing removes it
        flat = [0.9, 0.9, 0.9, 0.9]  # equal on the clients' own splits
        _fake_run(tmp_path, "local", seed, flat, [None, base, base, base])
        # +5 points on the global set, ±0.5 by seed: significant
        gain = 0.05 + (0.005 if seed % 2 else -0.005)
        _fake_run(tmp_path, "fedktl", seed, flat, [None, None, base + gain, base + gain])
        # ±3 points by seed around 0: not significant
        _fake_run(tmp_path, "fd", seed, flat, [None, base, base, base + (0.09 if seed % 2 else -0.09)])
    _fake_run(tmp_path, "fd", 4, [0.9] * 4)  # a run from before the global set: no global figure
    res = accuracy.summarize(tmp_path, suite, last_k=3)
    sc = res["scenarios"][0]
    rows = {r["variant"]: r for r in sc["rows"]}
    assert rows["local"]["per_seed"][1]["global_last_k"] == pytest.approx(35.0)
    assert rows["fd"]["seeds"] == [0, 1, 2, 3, 4] and rows["fd"]["global_seeds"] == [0, 1, 2, 3]
    assert "global_last_k" not in rows["fd"]["per_seed"][4]
    # only the rounds scored on it count: fedktl's mean is over its last 2 rounds
    assert rows["fedktl"]["per_seed"][0]["global_last_k"] == pytest.approx(100 * (0.3 + 0.045))
    pair = sc["paired"]["fedktl"]["global_last_k"]
    assert pair["seeds"] == [0, 1, 2, 3] and pair["mean"] == pytest.approx(5.0) and pair["significant"]
    assert not sc["paired"]["fd"]["global_last_k"]["significant"]
    assert not sc["paired"]["fedktl"]["last_k"]["significant"]  # level on the clients' own splits
    table = accuracy.to_markdown({**res, "profile": "cpu", "machine": "m", "last_k": 3}, suite, "cmd", {})
    assert (
        "| global test set, mean of last 3 rounds (%) | Δ global last-3 vs local, paired, 95 % CI |" in table
    )
    lines = table.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| variant |"))
    assert {line.count("|") for line in lines[at : at + 5]} == {13}  # 12 columns in every line
    assert "Paired differences to local on the global test set" in table
    assert "significant: fedktl (+5.00); not significant (interval contains 0): fd" in table
    # a table of runs without the global set keeps its old columns
    for r in sc["rows"]:
        r["global_last_k"] = None
    assert "| global test set, mean" not in accuracy.to_markdown(
        {**res, "profile": "cpu", "machine": "m", "last_k": 3}, suite, "cmd", {}
    )


def test_a_table_of_runs_from_two_machines_names_each_with_its_runs(tmp_path: Path) -> None:
    suite = _local_fedktl_fd()
    box = {"cpu": "AMD EPYC 7B13", "cores": 2, "threads": 1, "cpu_capability": "AVX2", "gpu": None}
    xeon = {"cpu": "Intel Xeon", "cores": 16, "threads": 1, "cpu_capability": "AVX512", "gpu": None}
    here = {"python": "3.11.7", "torch": "2.13.0+cpu"}
    for seed in range(3):
        _fake_run(tmp_path, "local", seed, [0.5, 0.6], host=box, versions=here)
        _fake_run(tmp_path, "fedktl", seed, [0.5, 0.7], host=xeon if seed == 2 else box, versions=here)

    def table() -> str:
        res = accuracy.summarize(tmp_path, suite)
        return accuracy.to_markdown({**res, "profile": "cpu", "machine": "m", "last_k": 3}, suite, "cmd", {})

    header = table().splitlines()[2]
    assert header.startswith(
        "`cmd` (written on m); runs: 5 on AMD EPYC 7B13, 2 cores (1 thread, AVX2), no GPU;"
    )
    assert "1 on Intel Xeon, 16 cores (1 thread, AVX512), no GPU; Python 3.11.7, torch 2.13.0+cpu." in header
    # one machine: named alone; a run that predates the host record says so instead of naming this machine
    (tmp_path / "dir-lowdata" / "fedktl-s2" / "summary.json").unlink()
    assert table().splitlines()[2] == (
        "`cmd` on AMD EPYC 7B13, 2 cores (1 thread, AVX2), no GPU; Python 3.11.7, torch 2.13.0+cpu. Device: cpu."
    )
    _fake_run(tmp_path, "fd", 0, [0.5, 0.6], versions={"python": "3.12.3", "torch": "2.11.0"})
    assert "1 on a machine not recorded (Python 3.12.3, torch 2.11.0)" in table().splitlines()[2]
