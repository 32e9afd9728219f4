"""Admission from the real memory limit (issue 23, item 3): the cgroup's (v1 and v2) or the available
memory, whichever is lower — not a quarter of the host's RAM inside a 3 GB container."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ktl.api.admission as admission
from ktl.api.admission import DeviceBudget, cgroup_memory_limit, memory_limit
from ktl.api.schemas import FederationSpec
from ktl.errors import InvalidRequestError

GIB = 2**30


def fake_v2(tmp: Path, limits: dict[str, str]) -> tuple[Path, Path]:
    root = tmp / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    for rel, value in limits.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / "memory.max").write_text(value + "\n")
    proc = tmp / "proc-cgroup"
    proc.write_text("0::/system.slice/ktl.service\n")
    return root, proc


def fake_v1(tmp: Path, path: str, value: str) -> tuple[Path, Path]:
    root = tmp / "cgroup"
    (root / "memory" / path).mkdir(parents=True)
    (root / "memory" / path / "memory.limit_in_bytes").write_text(value + "\n")
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # the host: no limit
    proc = tmp / "proc-cgroup"
    proc.write_text(f"9:name=systemd:/\n4:cpu,memory:/{path}\n1:cpuset:/\n0::/\n")
    return root, proc


def meminfo(tmp: Path, available_gib: float) -> Path:
    path = tmp / "meminfo"
    path.write_text(f"MemTotal: 999999999 kB\nMemAvailable: {int(available_gib * 2**20)} kB\n")
    return path


def test_cgroup_v2_takes_the_tightest_of_the_cgroup_and_its_parents(tmp_path: Path) -> None:
    root, proc = fake_v2(tmp_path, {"system.slice/ktl.service": "max", "system.slice": str(3 * GIB)})
    assert cgroup_memory_limit(root, proc) == 3 * GIB
    assert memory_limit(root, proc, meminfo(tmp_path, 100)) == min(3 * GIB, memory_limit())  # RAM may be less


def test_cgroup_v1_limit_and_unlimited(tmp_path: Path) -> None:
    root, proc = fake_v1(tmp_path, "docker/abc", str(2 * GIB))
    assert cgroup_memory_limit(root, proc) == 2 * GIB
    (root / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory_limit(root, proc) is None  # v1's "no limit"
    assert cgroup_memory_limit(root, tmp_path / "no-such-file") is None


def test_cgroup_v1_mounted_from_the_containers_own_cgroup(tmp_path: Path) -> None:
    """/proc/self/cgroup names the host's path (4:memory:/docker/abc/ktl); the mount starts at docker/abc."""
    root = tmp_path / "cgroup"
    (root / "memory" / "ktl").mkdir(parents=True)
    (root / "memory" / "ktl" / "memory.limit_in_bytes").write_text(str(GIB))
    (root / "memory" / "memory.limit_in_bytes").write_text(str(4 * GIB))  # the container's own limit
    proc = tmp_path / "proc-cgroup"
    proc.write_text("4:memory:/docker/abc/ktl\n")
    assert cgroup_memory_limit(root, proc) == GIB
    proc.write_text("4:memory:/docker/abc\n")
    assert cgroup_memory_limit(root, proc) == 4 * GIB


def test_available_memory_wins_when_lower(tmp_path: Path) -> None:
    root, proc = fake_v2(tmp_path, {"system.slice": str(8 * GIB)})
    assert memory_limit(root, proc, meminfo(tmp_path, 1.5)) == int(1.5 * GIB)


def test_the_cpu_budget_is_a_quarter_of_the_container_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old code: in a 3 GB cgroup, 5.89 GiB per federation (a quarter of the host's RAM) and a spec of
    4.83 GiB admitted; each upload then got the server OOM-killed."""
    root, proc = fake_v2(tmp_path, {"system.slice/ktl.service": str(3 * GIB)})
    monkeypatch.setattr(admission, "CGROUP_ROOT", root)
    monkeypatch.setattr(admission, "PROC_CGROUP", proc)
    monkeypatch.setattr(admission, "MEMINFO", meminfo(tmp_path, 100))
    budget = DeviceBudget.measure(torch.device("cpu"), memory_bytes=None, seconds=1e9)
    assert budget.memory_bytes == 3 * GIB // 4
    spec = FederationSpec.model_validate({"method": "fedtgp", "num_classes": 1000, "quorum": 1000,
                                          "baseline": {"tgp_hidden_dim": 65536}})  # fmt: skip
    estimate = budget.estimate(spec, None)
    assert estimate.memory_bytes > 3 * GIB // 4  # a spec between the container's share and the host's
    with pytest.raises(InvalidRequestError) as info:
        budget.admit(spec, None)
    assert info.value.reason == "too_costly" and "0.75 GiB" in str(info.value)
