from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ktl.aligner import Aligner
from ktl.config import build_config
from ktl.errors import ConfigError
from ktl.records import Pairs
from ktl.simulate import run_simulation

TINY = {
    "rounds": 2,
    "num_clients": 3,
    "models": ["cnn4", "resnet-s"],
    "data": {"dataset": "synthetic", "fraction": 0.3, "alpha": 1.0},
    "client": {"lr": 0.05, "batch_size": 32},
    "aligner": {"steps": 20, "prior_samples": 64, "bandwidth_samples": 256},
}


def tiny(tmp_path: Path, name: str, **extra: object):
    return build_config(overrides={**TINY, "out": str(tmp_path / name), **extra})


def test_two_round_fedktl_simulation_writes_a_complete_run_folder(tmp_path: Path) -> None:
    summary = run_simulation(tiny(tmp_path, "run"), progress=False)
    run = tmp_path / "run"
    assert {"config.json", "metrics.jsonl", "summary.json", "pairs.safetensors", "pairs.png", "aligner"} <= {
        p.name for p in run.iterdir()
    }
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    assert all(0 <= r["accuracy"] <= 1 and r["skipped_steps"] == 0 for r in lines)
    assert lines[0]["distill_loss"] == 0 and lines[1]["distill_loss"] > 0  # pairs arrive after round 1
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in (
        "method",
        "preset",
        "seed",
        "final_accuracy",
        "best_accuracy",
        "bytes_up_per_client_round",
        "bytes_down_per_client_round",
        "wall_time_s",
        "generator",
    ):
        assert key in summary
    assert summary["final_accuracy"] == lines[-1]["accuracy"]
    # where it ran: tables built from runs of several machines name each (ktl.host)
    assert summary["host"]["threads"] == torch.get_num_threads() and summary["host"]["cores"] >= 1
    assert summary["host"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert summary["versions"]["torch"] == torch.__version__
    assert summary["bytes_up_per_client_round"] > 0 and summary["bytes_down_per_client_round"] > 0
    pairs = Pairs.from_bytes((run / "pairs.safetensors").read_bytes())
    assert pairs.images.shape[1:] == (3, 32, 32) and len(pairs) >= 1
    assert (run / "pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Aligner.from_pretrained(run / "aligner").latent_dim == 256
    config = json.loads((run / "config.json").read_text())
    assert config["rounds"] == 2 and config["out"] == str(run)


def test_same_seed_same_numbers_on_cpu(tmp_path: Path) -> None:
    a = run_simulation(tiny(tmp_path, "a", seed=3), progress=False)
    b = run_simulation(tiny(tmp_path, "b", seed=3), progress=False)
    metrics = [
        [json.loads(line)["accuracy"] for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("a", "b")
    ]
    assert metrics[0] == metrics[1]
    assert a["final_accuracy"] == b["final_accuracy"]
    assert (tmp_path / "a" / "pairs.safetensors").read_bytes() == (
        tmp_path / "b" / "pairs.safetensors"
    ).read_bytes()


def test_local_method_exchanges_nothing(tmp_path: Path) -> None:
    summary = run_simulation(tiny(tmp_path, "local", method="local"), progress=False)
    assert summary["bytes_up_per_client_round"] == 0 and summary["bytes_down_per_client_round"] == 0
    assert not (tmp_path / "local" / "pairs.safetensors").exists()


def test_fp16_upload_is_c_by_k_by_two_bytes_plus_framing(tmp_path: Path) -> None:
    summary = run_simulation(tiny(tmp_path, "fp16", rounds=1), progress=False)
    fp32 = run_simulation(
        tiny(tmp_path, "fp32", rounds=1, fedktl={"upload_dtype": "float32"}), progress=False
    )
    assert summary["bytes_up_per_client_round"] < fp32["bytes_up_per_client_round"]


def test_existing_run_folder_is_not_touched(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="already exists"):
        run_simulation(tiny(tmp_path, "taken"), progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
