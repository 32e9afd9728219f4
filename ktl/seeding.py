"""Derived seeds: one run seed fans out into independent, stable streams (data, models, rounds).

And the pinned mode (``KTL_REPRODUCIBLE=1``): a seed fixes the draws, but a run's float numbers also depend
on the code paths the math libraries pick for the CPU at hand — ATen's AVX2/AVX-512 kernels, MKL's and
oneDNN's per-ISA kernels, glibc libm's FMA variants — and on how reductions are split over threads. Measured
on the smoke preset: round 1's accuracy is 0.61–0.70 depending on the kernel set (training is chaotic: one
last bit of difference grows into another trajectory). The pinned mode holds every library to one portable
code path and one thread, so the same seed gives the same numbers, bit for bit, on any x86-64 CPU with the
same versions of torch, MKL, numpy and glibc. It is slower (one thread, no oneDNN/NNPACK convolutions).

The environment part must be in place when the process starts (glibc reads its tunables at start-up, ATen
and MKL on first use): :func:`reproducible_env` gives a child process's environment; ``ktl`` re-executes
itself with it when ``KTL_REPRODUCIBLE=1`` (see ``ktl.cli.main``); :func:`pin_backends` does the in-process
part and checks the environment part.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import torch

from ktl.errors import KtlError

__all__ = [
    "REPRODUCIBLE_ENV",
    "REPRODUCIBLE_FLAG",
    "derive_seed",
    "pin_backends",
    "reproducible_env",
    "reproducible_env_in_place",
    "reproducible_requested",
    "torch_generator",
]

# Asks for the pinned mode (any process: ``KTL_REPRODUCIBLE=1 ktl simulate …``).
REPRODUCIBLE_FLAG = "KTL_REPRODUCIBLE"

# The pinned mode's environment, each setting for one source of CPU-dependent rounding.
REPRODUCIBLE_ENV: dict[str, str] = {
    # ATen's portable kernels (the x86-64 baseline build), not the AVX2/AVX-512 ones picked by CPU.
    "ATEN_CPU_CAPABILITY": "default",
    # MKL's conditional numerical reproducibility: one code path on every x86-64 CPU (Intel's or AMD's);
    # STRICT: gemm's results do not depend on how the operands are aligned in memory.
    "MKL_CBWR": "COMPATIBLE,STRICT",
    # oneDNN is switched off in the pinned mode (pin_backends: its blocking follows the cache sizes);
    # should anything use it anyway, it is held to SSE4.1, which every x86-64 CPU in use has.
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    # Float reductions depend on how the work is split over threads: one thread everywhere.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    # glibc's libm takes FMA variants of exp/log/pow/sin… on FMA CPUs (measured: other last bits); numpy's
    # seeded Dirichlet/normal draws go through them. Both spellings: glibc < 2.33 and >= 2.33.
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2_Usable,-FMA_Usable,-FMA4_Usable,-AVX2,-FMA,-FMA4",
    REPRODUCIBLE_FLAG: "1",
}


def derive_seed(seed: int, *keys: str | int) -> int:
    """A 63-bit seed determined by ``seed`` and ``keys`` alone (stable across runs and platforms)."""
    digest = hashlib.sha256(repr((int(seed), *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def torch_generator(seed: int, *keys: str | int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys))


def reproducible_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``KTL_REPRODUCIBLE=1`` asks for the pinned mode."""
    return (os.environ if environ is None else environ).get(REPRODUCIBLE_FLAG, "") == "1"


def reproducible_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) with the pinned mode's settings; the caller's other settings
    stay — ``MKL_ENABLE_INSTRUCTIONS`` for one, which emulates a smaller CPU and must not change a thing."""
    env = dict(os.environ if environ is None else environ)
    tunables = [
        t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.cpu.hwcaps=")
    ]
    env.update(REPRODUCIBLE_ENV)
    env["GLIBC_TUNABLES"] = ":".join([*tunables, REPRODUCIBLE_ENV["GLIBC_TUNABLES"]])
    return env


def reproducible_env_in_place(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process started with the pinned mode's environment (then pin_backends completes it)."""
    env = os.environ if environ is None else environ
    return all(
        env.get(name) == value if name != "GLIBC_TUNABLES" else value in env.get(name, "").split(":")
        for name, value in REPRODUCIBLE_ENV.items()
    )


def pin_backends() -> None:
    """The in-process part of the pinned mode: one torch thread, convolutions through ATen's im2col + MKL
    gemm (oneDNN's and NNPACK's kernels are chosen per CPU). Raises KtlError when the process did not start
    with :func:`reproducible_env` (then the kernels are the CPU's and the numbers would not be pinned)."""
    if not reproducible_env_in_place() or torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        raise KtlError(
            "the pinned mode needs its environment from the start of the process: "
            "run it as KTL_REPRODUCIBLE=1 ktl …, or in a child started with ktl.seeding.reproducible_env()"
        )
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
    torch.backends.nnpack.set_flags(False)
