"""``ktl simulate`` gives the pinned per-round numbers: a change that alters what a method computes — its
training, its payloads, its server step, its noise — changes them; reorganising code must not.

Why a pinned mode and exact comparison, not a tolerance: the float numbers of a run depend on the kernels
the math libraries pick for the CPU (ATen's AVX2/AVX-512 builds, MKL's and oneDNN's per-ISA code, glibc
libm's FMA variants) and on the thread count, and training is chaotic — measured on this suite's smoke case
with one thread: round 1's accuracy is 0.688 with ATen's AVX-512 kernels, 0.699 with AVX2, 0.680 with the
portable ones, 0.617 with MKL held to one code path too (and 0.627 with the default two threads). No
tolerance both holds across CPUs and still notices a change. So the runs go through a child process in
``ktl.seeding``'s pinned mode (``KTL_REPRODUCIBLE=1``: portable ATen kernels, ``MKL_CBWR=COMPATIBLE,STRICT``,
no oneDNN/NNPACK, libm without FMA, one thread), which gives the same bits on every x86-64 CPU — whatever
the parent's environment says (``test_the_pinned_mode_ignores_the_cpu_the_parent_names`` checks it with
MKL and glibc told to act as an older CPU) — so every figure is compared exactly.
CPU-independent figures (bytes on the wire, counts, participants, class tables) would be exact anyway.

The cases are small (the pinned mode is one thread and slow) but each method family runs both rounds
through its client and server steps: FedKTL (generator + aligner), the prototype tables (FedProto, FedTGP),
FD's logits, differential privacy, and the six-backbone zoo on Fashion-MNIST.

The pins live in tests/regression_pins.json. A change meant to alter what a method computes regenerates them
with ONE command (and says why in its commit)::

    .venv/bin/python -m tests.test_regression --update            # every case
    .venv/bin/python -m tests.test_regression --update smoke/fd   # some cases

Pins hold for one torch/MKL/numpy/glibc set; a new torch may need new pins.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from ktl.cli import main
from ktl.config import build_config
from ktl.data.fashion_mnist import find_fashion_mnist
from ktl.errors import DataError
from ktl.seeding import REPRODUCIBLE_ENV, pin_backends, reproducible_env
from ktl.simulate import run_simulation

ROOT = Path(__file__).resolve().parent.parent
PINS = Path(__file__).with_name("regression_pins.json")

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # the smoke preset (synthetic data, cnn4 + resnet-s, 4 clients, 2 rounds) on a quarter of its data
    "smoke": ("smoke", {"data": {"fraction": 0.25}}),
    "smoke-dp": ("smoke", {"data": {"fraction": 0.25}, "privacy": {"epsilon": 8.0}}),
    # cpu-small's data (Fashion-MNIST) and its six-backbone zoo, cut to 2 rounds of 6 clients on 1 %
    "cpu-small": ("cpu-small", {"num_clients": 6, "rounds": 2, "data": {"fraction": 0.01}}),
}
KEYS = ["smoke/fedktl", "smoke/fedproto", "smoke/fedtgp", "smoke/fd", "smoke-dp/fedktl", "cpu-small/fedktl"]
# The case the environment check repeats: the cheapest one.
PROBE_KEY = "smoke/fedproto"


def _has_fashion_mnist() -> bool:
    try:
        find_fashion_mnist()
    except DataError:
        return False
    return True


def _pinned_fields(row: dict[str, Any]) -> dict[str, Any]:
    """What a round's row pins: everything but wall-clock times."""
    return {name: value for name, value in row.items() if not name.endswith("seconds")}


def _simulate(key: str, out: Path) -> list[dict[str, Any]]:
    case, method = key.split("/")
    preset, overrides = CASES[case]
    torch.manual_seed(1234)  # as the suite's autouse seed
    config = build_config(preset=preset, overrides={**overrides, "method": method, "out": str(out)})
    run_simulation(config, progress=False)
    return [_pinned_fields(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_pinned(keys: list[str], environ: dict[str, str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The cases' rows, simulated in one child process in the pinned mode started from ``environ``."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rows.json"
        command = [sys.executable, "-m", "tests.test_regression", "--child", str(result), *keys]
        done = subprocess.run(
            command, cwd=ROOT, env=reproducible_env(environ), capture_output=True, text=True, timeout=1200
        )
        if done.returncode != 0:
            raise RuntimeError(f"pinned run failed ({done.returncode}):\n{done.stderr[-4000:]}")
        rows: dict[str, list[dict[str, Any]]] = json.loads(result.read_text())
        return rows


def _runnable(keys: list[str]) -> list[str]:
    fmnist = _has_fashion_mnist()
    return [k for k in keys if fmnist or CASES[k.split("/")[0]][0] != "cpu-small"]


@pytest.fixture(scope="module")
def pinned_runs() -> dict[str, list[dict[str, Any]]]:
    return run_pinned(_runnable(KEYS))


def _assert_rows(rows: list[dict[str, Any]], pinned: list[dict[str, Any]]) -> None:
    assert len(rows) == len(pinned)
    for row, pin in zip(rows, pinned, strict=True):
        for name, value in pin.items():
            assert row.get(name) == value, (row["round"], name, row.get(name), value)


def test_every_case_is_pinned() -> None:
    assert sorted(json.loads(PINS.read_text())) == sorted(KEYS)
    assert PROBE_KEY in KEYS


@pytest.mark.parametrize("key", KEYS)
def test_simulate_reproduces_the_pinned_per_round_numbers(
    pinned_runs: dict[str, list[dict[str, Any]]], key: str
) -> None:
    if key not in pinned_runs:
        pytest.skip("Fashion-MNIST is not installed (make setup installs it as root)")
    _assert_rows(pinned_runs[key], json.loads(PINS.read_text())[key])


def test_the_pinned_mode_ignores_the_cpu_the_parent_names() -> None:
    # The parent asks for AVX2 kernels, tells MKL to act as a CPU without AVX (SSE4.2 at most) and glibc as
    # one without AVX-512: the pinned mode's child must still give the same bits.
    older_cpu = {
        **os.environ,
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F",
        "OMP_NUM_THREADS": "2",
    }
    rows = run_pinned([PROBE_KEY], older_cpu)
    _assert_rows(rows[PROBE_KEY], json.loads(PINS.read_text())[PROBE_KEY])


def test_ktl_reexecutes_itself_into_the_pinned_mode_and_a_process_without_it_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command: KTL_REPRODUCIBLE=1 is enough, ktl restarts itself with the pinned environment (without
    # it, pin_backends would refuse: exit status 2, as below).
    env = {k: v for k, v in os.environ.items() if k not in REPRODUCIBLE_ENV} | {"KTL_REPRODUCIBLE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "ktl", "list"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    # In-process, where the environment can no longer take effect: refused in one line, nothing runs.
    monkeypatch.setenv("KTL_REPRODUCIBLE", "1")
    for name in REPRODUCIBLE_ENV:
        if name != "KTL_REPRODUCIBLE":
            monkeypatch.delenv(name, raising=False)
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ktl: error: the pinned mode needs") and err.count("\n") == 1


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.test_regression", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--update", action="store_true", help="regenerate tests/regression_pins.json")
    parser.add_argument(
        "--child", type=Path, help=argparse.SUPPRESS
    )  # the pinned-mode child: rows to this file
    parser.add_argument("keys", nargs="*", help=f"cases (default: all of {', '.join(KEYS)})")
    args = parser.parse_args(argv)
    keys = args.keys or KEYS
    unknown = sorted(set(keys) - set(KEYS))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}: add them to KEYS first")
    if args.child:
        pin_backends()
        with tempfile.TemporaryDirectory() as tmp:
            rows = {key: _simulate(key, Path(tmp) / key.replace("/", "-")) for key in keys}
        args.child.write_text(json.dumps(rows))
        return 0
    if not args.update:
        parser.error("give --update (the tests run under pytest)")
    if _runnable(keys) != keys:
        parser.error("Fashion-MNIST is not installed (make setup installs it as root)")
    pins = json.loads(PINS.read_text()) if PINS.exists() else {}
    pins = {k: v for k, v in pins.items() if k in KEYS} | run_pinned(keys)
    PINS.write_text(json.dumps({k: pins[k] for k in KEYS if k in pins}, indent=1) + "\n")
    sys.stdout.write(f"wrote {PINS.relative_to(ROOT)}: {', '.join(keys)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
