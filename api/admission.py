"""Admission control: a federation's server step is estimated before the federation exists.

Each method estimates its own step (`Method.server_cost`: peak device memory, optimisation steps, flops
per step) for the worst round its spec allows (every upload of the quorum holding all C classes). The
server measures its device once at start-up — a matrix product for the flop rate, a small Adam loop for
the fixed cost of a step — and refuses a spec whose memory exceeds ``max_federation_bytes`` (default: a
quarter of the device's memory) or whose time exceeds ``max_align_seconds``, with 422 ``too_costly``.
On the CPU "the device's memory" is what this process may really use (`memory_limit`): the lowest of the
machine's RAM, the memory available at start-up and the limit of its cgroup (v1
``memory.limit_in_bytes``, v2 ``memory.max``, the tightest of the cgroup and its parents) — in a
container of 3 GB, not a quarter of the host's RAM.
The estimates are deliberately rough (a factor of a few): they stop a spec that would exhaust the
device, not one that is merely slow — ``max_align_seconds`` still bounds every round at run time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ktl.api.schemas import FederationSpec
from ktl.device import synchronize
from ktl.errors import InvalidRequestError
from ktl.generator import Generator
from ktl.methods import CostShape

__all__ = ["CostEstimate", "DeviceBudget", "cgroup_memory_limit", "memory_limit"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
MEMINFO = Path("/proc/meminfo")
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit number (and some kernels a little
# less); anything from 2^60 bytes up means unlimited.
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class CostEstimate:
    memory_bytes: int
    seconds: float


def _read_limit(path: Path) -> int | None:
    """A cgroup memory limit file's bytes; None when absent, unreadable or unlimited (``max``)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None  # "max" (v2): no limit
    value = int(text)
    return value if 0 < value < _UNLIMITED else None


def cgroup_memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """The memory limit of this process's cgroup in bytes, or None where there is none.

    cgroup v2 (``0::/path``): the lowest ``memory.max`` of the cgroup and every parent up to the root;
    v1 (``N:memory:/path`` or ``N:cpu,memory:/path``): ``memory.limit_in_bytes`` of the memory cgroup, and of
    its parents. Inside a container the hierarchy is often mounted from the container's own cgroup down,
    while the path still names it from the host's root: the longest tail of the path found under the
    mount is where the walk up starts."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = Path(path.strip().lstrip("/"))
        if controllers == "" and (root / "cgroup.controllers").exists():  # v2, unified
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):  # v1
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        parts = rel.parts
        start = next(
            (Path(*parts[i:]) for i in range(len(parts)) if (base / Path(*parts[i:])).is_dir()), Path(".")
        )
        for folder in (start, *start.parents):
            limit = _read_limit(base / folder / name)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def _available_memory(meminfo: Path = MEMINFO) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP, meminfo: Path = MEMINFO) -> int:
    """The memory this process may use: the lowest of the machine's RAM, the memory available now
    (``MemAvailable``) and its cgroup's limit (`cgroup_memory_limit`)."""
    candidates = [int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))]
    for value in (_available_memory(meminfo), cgroup_memory_limit(root, proc_cgroup)):
        if value is not None:
            candidates.append(value)
    return min(candidates)


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return memory_limit(CGROUP_ROOT, PROC_CGROUP, MEMINFO)  # read now: tests point them at fake files


def _flop_rate(device: torch.device, n: int = 512, repeats: int = 3) -> float:
    """Best of a few ``n × n`` float32 products, in flop/s."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / max(best, 1e-9)


def _step_overhead(device: torch.device, steps: int = 20) -> float:
    """Seconds of one Adam step of a tiny MLP: the per-step cost that no flop count shows."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).to(device)
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(4, 8, device=device)
    best = float("inf")
    for _ in range(3):  # the first pass warms up (allocator, kernels); keep the best
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = model(x).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


@dataclass(frozen=True)
class DeviceBudget:
    """What one federation may ask of the device, and how fast the device is (measured)."""

    memory_bytes: int
    seconds: float
    flops_per_s: float
    step_overhead_s: float

    @classmethod
    def measure(cls, device: torch.device, *, memory_bytes: int | None, seconds: float) -> DeviceBudget:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            rate, overhead = _flop_rate(device), _step_overhead(device)
        limit = memory_bytes if memory_bytes is not None else _device_memory(device) // 4
        return cls(memory_bytes=limit, seconds=seconds, flops_per_s=rate, step_overhead_s=overhead)

    def estimate(self, spec: FederationSpec, generator: Generator | None) -> CostEstimate:
        """The worst round of ``spec``: every upload of the quorum with all C classes."""
        shape = CostShape(
            num_classes=spec.num_classes,
            proto_dim=spec.dim,
            rows=spec.num_classes * spec.quorum,
            latent_dim=generator.latent_dim if generator is not None else 0,
            image_values=generator.num_channels * generator.image_size**2 if generator is not None else 0,
        )
        cost = spec.method_class.server_cost(spec.method_settings(), shape)
        per_step = self.step_overhead_s + cost.flops_per_step / self.flops_per_s
        return CostEstimate(memory_bytes=int(cost.memory_bytes), seconds=cost.steps * per_step)

    def admit(self, spec: FederationSpec, generator: Generator | None) -> CostEstimate:
        """The estimate, or `InvalidRequestError` ``too_costly`` naming what is over which limit."""
        est = self.estimate(spec, generator)
        if est.memory_bytes > self.memory_bytes:
            raise InvalidRequestError(
                "too_costly",
                f"this federation's server step would need about {est.memory_bytes / 2**30:.2f} GiB on the "
                f"device; the limit is {self.memory_bytes / 2**30:.2f} GiB (max_federation_bytes): use a "
                "smaller aligner, fewer classes or a smaller quorum",
                estimate_bytes=est.memory_bytes,
                limit_bytes=self.memory_bytes,
            )
        if est.seconds > self.seconds:
            raise InvalidRequestError(
                "too_costly",
                f"this federation's server step would take about {est.seconds:.0f} s on this device; the "
                f"limit is {self.seconds:g} s (max_align_seconds): use fewer steps or a smaller aligner",
                estimate_seconds=round(est.seconds, 3),
                limit_seconds=self.seconds,
            )
        return est
