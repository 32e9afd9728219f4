"""`ktl bench generate` on a tiny load: 1 vs 2 processes of `ktl generate` (whole command and after its
start-up), and bare forward vs the shard loop per precision and batch size for both generators."""

import json
from pathlib import Path

import pytest

from ktl.cli import main


@pytest.mark.slow  # make test-all (make test keeps ktl generate across processes in test_generate)
def test_the_generate_benchmark_measures_processes_and_job_vs_bare(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = [
        "-q",
        "bench",
        "generate",
        "--device",
        "cpu",
        "--classes",
        "2",
        "--per-class",
        "16",
        "--repeats",
        "1",
    ]
    docs = tmp_path / "benchmarks.md"
    grid = ["--batch-sizes", "8", "--images", "16", "--unet-steps", "1"]
    assert main([*args, *grid, "--json", "--write", str(docs)]) == 0
    res = json.loads(capsys.readouterr().out)
    # a section per device type, as `ktl bench server` writes: a GPU run leaves the CPU figures alone
    assert "<!-- bench:generate-cpu:start -->" in docs.read_text()
    rows = res["processes"]["rows"]
    assert [r["processes"] for r in rows] == [1, 2] and res["processes"]["images"] == 32
    assert all(r["wall_s"] > 0 and r["startup_s"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert res["processes"]["ratio"] > 0
    grid = res["grid"]
    assert {(r["generator"].split()[0], r["precision"]) for r in grid} == {
        (g, p) for g in ("embedded", "diffusers") for p in ("fp32", "bf16")
    }
    assert all(r["bare_images_per_s"] > 0 and r["job_images_per_s"] > 0 for r in grid)


def test_compile_cells_outside_the_grid_are_refused_before_anything_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["bench", "generate", "--device", "cpu", "--processes", "0", "--no-unet", "--batch-sizes", "8"]
    assert main([*args, "--images", "16", "--compile", "--compile-cells", "bf16x8,fp16x8"]) == 2
    assert "cells of the grid are bf16x8, fp32x8" in capsys.readouterr().err
