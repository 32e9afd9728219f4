"""The CUDA path. Marked ``gpu``: skipped without CUDA, run on the device machine with ``pytest -m gpu``
(benchmarks/run_gpu.sh). ``KTL_GPU_TEST_DEVICE=cpu`` runs the same tests on the CPU (the script's rehearsal,
``--device cpu``): every import and code path is exercised, the CUDA-only checks are left out.

Each test has a deadline (``KTL_GPU_TEST_TIMEOUT`` seconds, default 150): a hung wait fails that test instead
of eating the device machine's lease. It is a SIGALRM timer, so it needs no plugin on the device image.
"""

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ktl.aligner import AlignerSettings
from ktl.config import build_config
from ktl.generator import GeneratorSpec, load_generator
from ktl.methods import KnowledgeTransferServer
from ktl.simulate import run_simulation
from tests.test_round import UPLOADS

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("KTL_GPU_TEST_DEVICE", "cuda")
CUDA = DEVICE == "cuda"
# Per-test deadline: the slowest test here took 57 s on a loaded 2-core CPU (the rehearsal), seconds on a GPU.
DEADLINE_S = float(os.environ.get("KTL_GPU_TEST_TIMEOUT", "150"))


@pytest.fixture(autouse=True)
def _deadline() -> Iterator[None]:
    """Raise in the test once it has run ``DEADLINE_S`` seconds (SIGALRM; pytest runs tests on the main
    thread, and the waits here are Python loops or interruptible lock waits)."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"over the per-test deadline of {DEADLINE_S:.0f} s (KTL_GPU_TEST_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """Full-precision float32 matmuls and convolutions (cuDNN runs convolutions in TF32 by default, ~1e-3
    relative error: a CPU comparison at 2e-3 could fail with no defect)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_server_round_on_cuda_matches_shapes_and_stays_on_device() -> None:
    generator = load_generator(GeneratorSpec(), DEVICE)
    server = KnowledgeTransferServer.create(
        num_classes=10,
        proto_dim=10,
        generator=generator,
        aligner_settings=AlignerSettings(steps=50),
        device=DEVICE,
    )
    assert generator.device.type == DEVICE and server.aligner.device.type == DEVICE
    result = server.run_round(UPLOADS, round_index=1)
    assert result.pairs.images.shape == (5, 3, 32, 32) and result.pairs.images.device.type == "cpu"
    assert all(v == v for v in result.history["loss"])


def test_tiny_simulation_on_cuda(tmp_path: Path) -> None:
    config = build_config(
        preset="smoke", overrides={"device": DEVICE, "out": str(tmp_path / "run"), "aligner": {"steps": 20}}
    )
    summary = run_simulation(config, progress=False)
    assert summary["device"].startswith(DEVICE) and 0 <= summary["final_accuracy"] <= 1
    assert not CUDA or torch.cuda.max_memory_allocated() > 0


def test_service_round_and_job_on_cuda(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from ktl.api import create_app
    from ktl.clients.sdk import KtlHttpClient
    from tests.api.conftest import ADMIN, FAST_ALIGNER, make_settings, protos

    app = create_app(make_settings(tmp_path / "d", device=DEVICE))
    with TestClient(app) as http:
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        fed = admin.create_federation({"num_classes": 10, "quorum": 1, "aligner": FAST_ALIGNER})
        client = KtlHttpClient("", admin.register_client(fed["id"])["token"], http=http, retries=0)
        client.upload(fed["id"], 1, protos([0, 1, 2]))
        assert client.wait_for_round(fed["id"], 1, timeout=120)["state"] == "published"
        job = admin.wait_for_job(
            admin.submit_job({"federation_id": fed["id"], "per_class": 64})["id"], timeout=120
        )
        assert job["state"] == "done" and admin.job_result(job["id"])["images"].shape[0] == 192
        assert not CUDA or "ktl_gpu_memory_peak_bytes" in http.get("/metrics").text


def test_bench_server_runs_on_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    from ktl.cli import main

    args = ["-q", "bench", "server", "--device", DEVICE, "--cases", "10x4", "--epochs", "2"]
    assert main([*args, "--jobs", "64", "--batch-sizes", "16,64", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["device"].startswith(DEVICE) and (not CUDA or res["peak_gpu_memory_mib"] > 0)
    assert res["cases"][0]["ours_default"]["loss"] == res["cases"][0]["ours_default"]["loss"]


def test_diffusion_adapters_on_cuda(tmp_path: Path, no_tf32: None) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler

    from tests.test_generator_adapters import _tiny_unet

    DDPMPipeline(unet=_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(
        tmp_path
    )
    cpu = load_generator(GeneratorSpec(kind="ddim", path=tmp_path, num_inference_steps=4), "cpu")
    gpu = load_generator(GeneratorSpec(kind="ddim", path=tmp_path, num_inference_steps=4), DEVICE)
    z = cpu.sample_latents(4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(gpu.synthesize(z).cpu(), cpu.synthesize(z), atol=2e-3, rtol=0)


def test_generate_on_cuda_is_deterministic_and_half_precision_stays_close(tmp_path: Path) -> None:
    """`ktl generate` on the GPU: the same command twice gives the same shard bytes; bf16/fp16 images stay
    within a few grey levels of fp32 (autocast), and the batch probe picks a power of two."""
    from safetensors.torch import load_file, save_file

    from ktl.cli import main

    latents = tmp_path / "latents.safetensors"
    save_file({"latents": torch.randn(4, 256, generator=torch.Generator().manual_seed(0))}, str(latents))
    common = ["-q", "generate", "--latents", str(latents), "--per-class", "64", "--spread", "0.5", "--device",
              DEVICE, "--shard-size", "128", "--no-progress"]  # fmt: skip
    halves = ("fp16", "bf16") if CUDA else ("bf16",)  # fp16 is refused on the CPU
    images = {}
    for name, extra in {"a": [], "b": [], **{h: ["--precision", h] for h in halves}}.items():
        assert main([*common, "--out", str(tmp_path / name), *extra]) == 0
        images[name] = torch.cat(
            [load_file(str(p))["images"] for p in sorted((tmp_path / name).glob("shard-*.safetensors"))]
        )
    assert torch.equal(images["a"], images["b"])
    for half in halves:
        diff = (images[half].float() - images["a"].float()).abs()
        assert diff.mean() < 3 and images[half].shape == images["a"].shape, (half, diff.mean())
    assert main([*common, "--out", str(tmp_path / "auto"), "--batch-size", "auto"]) == 0
    spec = json.loads((tmp_path / "auto" / "manifest.json").read_text())["spec"]
    assert spec["batch_size"] & (spec["batch_size"] - 1) == 0


def test_server_job_on_cuda_gives_the_same_bytes_with_two_workers(tmp_path: Path) -> None:
    """Two workers on the GPU (cuda:0 twice: the code path of a two-GPU box) give the one-worker bytes."""
    from fastapi.testclient import TestClient

    from ktl.api import create_app
    from ktl.clients.sdk import KtlHttpClient
    from tests.api.conftest import ADMIN, make_settings

    results = []
    one = "cuda:0" if CUDA else "cpu"
    for name, devices in (("one", [one]), ("two", [one, one])):
        app = create_app(make_settings(tmp_path / name, device=None, devices=devices, job_batch_size=16))
        with TestClient(app) as http:
            admin = KtlHttpClient("", ADMIN, http=http, retries=0)
            latents = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).tolist()
            spec = {"latents": latents, "per_class": 40, "spread": 0.5, "seed": 3}
            job = admin.wait_for_job(admin.submit_job(spec)["id"], timeout=120)
            assert job["state"] == "done"
            results.append(admin.job_result_bytes(job["id"]))
    assert results[0] == results[1]
