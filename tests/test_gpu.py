"""The CUDA path. Marked ``gpu``: skipped without CUDA, run on the device machine with ``pytest -m gpu``."""

import json
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


def test_generate_on_cuda_is_deterministic_and_half_precision_stays_close(tmp_path: Path) -> None:
    """`ktl generate` on the GPU: the same command twice gives the same shard bytes; bf16/fp16 images stay
    within a few grey levels of fp32 (autocast), and the batch probe picks a power of two."""
    from safetensors.torch import load_file, save_file

    from ktl.cli import main

    latents = tmp_path / "latents.safetensors"
    save_file({"latents": torch.randn(4, 256, generator=torch.Generator().manual_seed(0))}, str(latents))
    common = ["-q", "generate", "--latents", str(latents), "--per-class", "64", "--spread", "0.5", "--device",
              "cuda", "--shard-size", "128", "--no-progress"]  # fmt: skip
    images = {}
    for name, extra in {
        "a": [],
        "b": [],
        "fp16": ["--precision", "fp16"],
        "bf16": ["--precision", "bf16"],
    }.items():
        assert main([*common, "--out", str(tmp_path / name), *extra]) == 0
        images[name] = torch.cat(
            [load_file(str(p))["images"] for p in sorted((tmp_path / name).glob("shard-*.safetensors"))]
        )
    assert torch.equal(images["a"], images["b"])
    for half in ("fp16", "bf16"):
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
    for name, devices in (("one", ["cuda:0"]), ("two", ["cuda:0", "cuda:0"])):
        app = create_app(make_settings(tmp_path / name, device=None, devices=devices, job_batch_size=16))
        with TestClient(app) as http:
            admin = KtlHttpClient("", ADMIN, http=http, retries=0)
            latents = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).tolist()
            spec = {"latents": latents, "per_class": 40, "spread": 0.5, "seed": 3}
            job = admin.wait_for_job(admin.submit_job(spec)["id"], timeout=120)
            assert job["state"] == "done"
            results.append(admin.job_result_bytes(job["id"]))
    assert results[0] == results[1]
