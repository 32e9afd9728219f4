"""Batch generation jobs: from centroids or latents, progress, results, cancel, and what is refused."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load

from ktl.api import create_app
from ktl.api.worker import ROUND_PRIORITY
from ktl.clients.sdk import KtlApiError, KtlHttpClient
from ktl.generator.base import DEFAULT_SPREAD
from tests.api.conftest import ADMIN, federation, make_settings, protos, register


def published_federation(admin: KtlHttpClient, http: TestClient, service) -> str:  # type: ignore[no-untyped-def]
    fed = federation(admin, quorum=2)
    a, b = register(admin, http, fed["id"], 2)
    a.upload(fed["id"], 1, protos([0, 1, 2]))
    b.upload(fed["id"], 1, protos([2, 3], seed=1))
    service.worker.wait_idle(60)
    assert admin.round(fed["id"], 1)["state"] == "published"
    return str(fed["id"])


def test_job_from_centroids_runs_to_done_and_is_deterministic(http, service, admin) -> None:
    fid = published_federation(admin, http, service)
    spec = {"federation_id": fid, "per_class": 5, "spread": 0.5, "seed": 3}
    job = admin.submit_job(spec)
    assert job["state"] == "queued" and job["total"] == 20 and job["done"] == 0
    done = admin.wait_for_job(job["id"], timeout=60, poll=0.01)
    assert done["state"] == "done" and done["done"] == 20 and done["progress"] == 1.0
    result = admin.job_result(job["id"])
    assert result["images"].shape == (20, 3, 32, 32) and result["images"].dtype == torch.uint8
    assert result["class_ids"].tolist() == [c for c in (0, 1, 2, 3) for _ in range(5)]
    centroids = load((service.store.round_dir(fid, 1) / "centroids.safetensors").read_bytes())["centroids"]
    spread = (result["latents"] - centroids[result["class_ids"]]).norm(dim=1)
    assert float(spread.min()) > 0  # spread > 0: distinct latents around each centroid
    again = admin.wait_for_job(admin.submit_job(spec)["id"], timeout=60, poll=0.01)
    assert torch.equal(admin.job_result(again["id"])["images"], result["images"])
    assert "ktl_images_generated_total 40.0" in http.get("/metrics").text


def test_job_from_given_latents_and_class_subset(http, service, admin) -> None:
    latents = torch.randn(3, 256).tolist()
    job = admin.wait_for_job(
        admin.submit_job({"latents": latents, "per_class": 2, "spread": 0})["id"], timeout=60, poll=0.01
    )
    result = admin.job_result(job["id"])
    assert result["images"].shape[0] == 6 and result["class_ids"].tolist() == [-1] * 6
    torch.testing.assert_close(result["latents"][::2], torch.tensor(latents))
    assert torch.equal(result["images"][0], result["images"][1])  # spread 0: one image per latent
    # The default spread gives distinct images around every latent (docs/generate.md).
    default = admin.wait_for_job(
        admin.submit_job({"latents": latents, "per_class": 2})["id"], timeout=60, poll=0.01
    )
    assert default["spec"]["spread"] == DEFAULT_SPREAD > 0
    images = admin.job_result(default["id"])["images"].flatten(1)
    assert len({bytes(row.numpy().tobytes()) for row in images}) == 6
    fid = published_federation(admin, http, service)
    sub = admin.wait_for_job(
        admin.submit_job({"federation_id": fid, "class_ids": [3, 0]})["id"], timeout=60, poll=0.01
    )
    assert admin.job_result(sub["id"])["class_ids"].tolist() == [3, 0]


def blocked_worker(service) -> threading.Event:  # type: ignore[no-untyped-def]
    """Occupy the device worker until the returned event is set."""
    release = threading.Event()
    service.worker.submit(ROUND_PRIORITY, lambda: release.wait(30) and None)
    return release


def test_result_before_done_and_cancel_while_queued(http, service, admin) -> None:
    release = blocked_worker(service)
    job = admin.submit_job({"latents": torch.randn(2, 256).tolist()})
    with pytest.raises(KtlApiError) as info:
        admin.job_result(job["id"])
    assert info.value.status == 409 and info.value.reason == "job_not_done"
    cancelled = admin.cancel_job(job["id"])
    assert cancelled["state"] == "cancelled"
    release.set()
    service.worker.wait_idle(30)
    assert admin.job(job["id"])["state"] == "cancelled"
    assert not service.store.job_result_path(job["id"]).exists()
    assert admin.cancel_job(job["id"])["state"] == "cancelled"  # a finished job: DELETE deletes it
    with pytest.raises(KtlApiError) as info:
        admin.job(job["id"])
    assert info.value.status == 404


def test_cancel_while_running_stops_between_batches(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "d", job_batch_size=1, job_progress_interval_s=0))
    with TestClient(app) as http:
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        job = admin.submit_job({"latents": torch.randn(1, 256).tolist(), "per_class": 2000})
        deadline = time.monotonic() + 30
        while admin.job(job["id"])["done"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        running = admin.job(job["id"])
        assert running["state"] == "running" and running["eta_s"] is not None and running["eta_s"] > 0
        admin.cancel_job(job["id"])
        app.state.service.worker.wait_idle(30)
        final = admin.job(job["id"])
        assert final["state"] == "cancelled" and final["done"] < 2000
        assert not app.state.service.store.job_result_path(job["id"]).exists()
        assert not list((tmp_path / "d" / "jobs").glob("*.partial"))


def test_progress_moves_to_done(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "d", job_batch_size=16, job_progress_interval_s=0))
    with TestClient(app) as http:
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        job = admin.submit_job({"latents": torch.randn(4, 256).tolist(), "per_class": 50, "spread": 0.2})
        seen = []
        while True:
            state = admin.job(job["id"])
            seen.append(state["done"])
            if state["state"] == "done":
                break
            time.sleep(0.005)
        assert seen == sorted(seen) and seen[-1] == 200 and len(set(seen)) > 2


@pytest.mark.parametrize(
    ("spec", "status", "reason"),
    [
        ({"latents": [[0.0] * 7]}, 422, "dim"),
        (b'{"latents": [[' + b", ".join([b"NaN"] * 256) + b"]]}", 422, "validation"),
        ({"latents": []}, 422, "empty"),
        ({"latents": [[0.0] * 256], "federation_id": "fed-x"}, 422, "validation"),
        ({}, 422, "validation"),
        ({"latents": [[0.0] * 256], "generator": "biggan"}, 422, "unknown_generator"),
        ({"latents": [[0.0] * 256] * 3, "per_class": 100_000}, 422, "too_many_images"),
        ({"federation_id": "fed-missing"}, 404, "unknown_federation"),
    ],
)
def test_bad_job_requests(http, service, admin, spec, status, reason) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    body = spec if isinstance(spec, bytes) else json.dumps(spec).encode()
    response = http.post("/v1/jobs", content=body, headers=headers)
    assert response.status_code == status and response.json()["error"]["reason"] == reason, response.text
    assert service.store.jobs_in_states("queued", "running", "done") == []


def test_job_needs_a_published_round(http, service, admin) -> None:
    fed = federation(admin)
    with pytest.raises(KtlApiError) as info:
        admin.submit_job({"federation_id": fed["id"]})
    assert info.value.status == 409 and info.value.reason == "no_published_round"
    fid = published_federation(admin, http, service)
    with pytest.raises(KtlApiError) as info:
        admin.submit_job({"federation_id": fid, "class_ids": [9]})
    assert info.value.reason == "class_not_present"
    with pytest.raises(KtlApiError) as info:
        admin.job("job-nope")
    assert info.value.status == 404


def test_a_long_job_blocks_neither_uploads_nor_rounds(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "d", job_batch_size=1, job_progress_interval_s=0))
    with TestClient(app) as http:
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        job = admin.submit_job({"latents": torch.randn(1, 256).tolist(), "per_class": 5000})
        while admin.job(job["id"])["done"] == 0:
            time.sleep(0.01)
        fed = federation(admin, quorum=2)
        a, b = register(admin, http, fed["id"], 2)
        t0 = time.monotonic()
        a.upload(fed["id"], 1, protos([0]))
        b.upload(fed["id"], 1, protos([1], seed=1))
        uploads_took = time.monotonic() - t0
        state = a.wait_for_round(fed["id"], 1, timeout=60, poll=0.01)
        running = admin.job(job["id"])
        assert state["state"] == "published" and state["bytes_received"] > 0
        assert running["state"] == "running" and running["done"] < 5000  # the round went ahead of the job
        assert uploads_took < 5.0
        admin.cancel_job(job["id"])
