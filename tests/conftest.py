from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from ktl.config import SimulateConfig
from ktl.simulate import run_simulation


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    skip_gpu = pytest.mark.skip(reason="needs CUDA: run on the device machine")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        # KTL_GPU_TEST_DEVICE=cpu: the GPU tests on the CPU (benchmarks/run_gpu.sh --device cpu, a rehearsal)
        rehearsal = os.environ.get("KTL_GPU_TEST_DEVICE") == "cpu"
        if "gpu" in item.keywords and not torch.cuda.is_available() and not rehearsal:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


def simulate_like_ray(config: SimulateConfig) -> dict[str, Any]:
    """``ktl simulate`` with one torch thread, as each of Flower's Ray workers trains (a client reserves one
    CPU): float reductions depend on the thread count, so this removes the one source of difference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_simulation(config, progress=False)
    finally:
        torch.set_num_threads(threads)
