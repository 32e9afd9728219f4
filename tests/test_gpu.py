"""The CUDA path. Marked ``gpu``: skipped without CUDA, run on the device machine with ``pytest -m gpu``."""

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


def test_server_round_on_cuda_matches_shapes_and_stays_on_device() -> None:
    generator = load_generator(GeneratorSpec(), "cuda")
    server = KnowledgeTransferServer.create(
        num_classes=10,
        proto_dim=10,
        generator=generator,
        aligner_settings=AlignerSettings(steps=50),
        device="cuda",
    )
    assert generator.device.type == "cuda" and server.aligner.device.type == "cuda"
    result = server.run_round(UPLOADS, round_index=1)
    assert result.pairs.images.shape == (5, 3, 32, 32) and result.pairs.images.device.type == "cpu"
    assert all(v == v for v in result.history["loss"])


def test_tiny_simulation_on_cuda(tmp_path: Path) -> None:
    config = build_config(
        preset="smoke", overrides={"device": "cuda", "out": str(tmp_path / "run"), "aligner": {"steps": 20}}
    )
    summary = run_simulation(config, progress=False)
    assert summary["device"].startswith("cuda") and 0 <= summary["final_accuracy"] <= 1
    assert torch.cuda.max_memory_allocated() > 0


def test_service_round_and_job_on_cuda(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from ktl.api import create_app
    from ktl.clients.sdk import KtlHttpClient
    from tests.api.conftest import ADMIN, FAST_ALIGNER, make_settings, protos

    app = create_app(make_settings(tmp_path / "d", device="cuda"))
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
        assert "ktl_gpu_memory_peak_bytes" in http.get("/metrics").text


def test_bench_server_runs_on_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from ktl.cli import main

    args = ["-q", "bench", "server", "--device", "cuda", "--cases", "10x4", "--epochs", "2"]
    assert main([*args, "--jobs", "64", "--batch-sizes", "16,64", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["device"].startswith("cuda") and res["peak_gpu_memory_mib"] > 0
    assert res["cases"][0]["ours_default"]["loss"] == res["cases"][0]["ours_default"]["loss"]


def test_diffusion_adapters_on_cuda(tmp_path: Path) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler

    from tests.test_generator_adapters import _tiny_unet

    DDPMPipeline(unet=_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(
        tmp_path
    )
    cpu = load_generator(GeneratorSpec(kind="ddim", path=tmp_path, num_inference_steps=4), "cpu")
    gpu = load_generator(GeneratorSpec(kind="ddim", path=tmp_path, num_inference_steps=4), "cuda")
    z = cpu.sample_latents(4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(gpu.synthesize(z).cpu(), cpu.synthesize(z), atol=2e-3, rtol=0)
