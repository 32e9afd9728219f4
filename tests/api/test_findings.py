"""The smaller findings of issue 23 (item 5) that live in the server: counts bounded by the spec, the ETF
built once per cold burst, jobs that respect min_free_bytes and wait out a full disk."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import ktl.api.jobs as jobs_module
import ktl.api.services.federations as federations_module
from ktl.api import create_app
from ktl.clients.sdk import KtlApiError, KtlHttpClient
from ktl.records import Prototypes
from tests.api.conftest import ADMIN, make_settings, protos, register


def test_counts_over_the_specs_max_samples_per_class_are_refused(
    http: TestClient, admin: KtlHttpClient
) -> None:
    """Old code: one client sending counts of 2^62 set a class's global prototype to its own vector."""
    fed = admin.create_federation(
        {"method": "fedproto", "num_classes": 10, "quorum": 2, "max_samples_per_class": 500}
    )
    a, b = register(admin, http, fed["id"], 2)
    p = protos([0, 1])
    with pytest.raises(KtlApiError) as info:
        a.upload(fed["id"], 1, Prototypes(p.vectors, p.class_ids, torch.tensor([2**62, 3])))
    assert (info.value.status, info.value.reason) == (422, "counts") and "500" in info.value.message
    assert admin.round(fed["id"], 1)["uploads"] == 0  # nothing stored
    a.upload(fed["id"], 1, Prototypes(p.vectors, p.class_ids, torch.tensor([500, 3])))  # at the bound: fine
    assert admin.federation(fed["id"])["spec"]["max_samples_per_class"] == 500


def test_a_cold_burst_of_etf_requests_builds_it_once(
    http: TestClient, admin: KtlHttpClient, service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old code: each request of a cold burst built its own ETF (~1 GB at C = 1000, K = 4096)."""
    fed = service.federations.get(
        admin.create_federation({"method": "fedproto", "num_classes": 7, "etf_seed": 123})["id"]
    )
    builds: list[int] = []
    real = federations_module.simplex_etf

    def slow(*args: Any, **kwargs: Any) -> torch.Tensor:
        builds.append(1)
        time.sleep(0.2)  # a big ETF takes a while: the others arrive meanwhile
        return real(*args, **kwargs)

    monkeypatch.setattr(federations_module, "simplex_etf", slow)
    federations_module._etf.cache_clear()
    federations_module._etf_bytes.cache_clear()
    answers: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: answers.append(service.federations.etf_bytes(fed))) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(set(answers)) == 1 and len(answers) == 6


def test_a_job_that_would_leave_less_than_min_free_bytes_is_refused(
    http: TestClient, admin: KtlHttpClient, service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old code: a 10k-image job ignored min_free_bytes and filled the disk (uploads then got 507)."""
    monkeypatch.setattr(service.store, "disk_free_bytes", lambda: service.settings.min_free_bytes + 100_000)
    latents = torch.randn(2, 256).tolist()
    with pytest.raises(KtlApiError) as info:
        admin.submit_job({"latents": latents, "per_class": 50})  # 100 images of 3 × 32 × 32: ~400 kB
    assert (info.value.status, info.value.reason) == (507, "insufficient_storage")
    assert "min_free_bytes" in info.value.message
    assert admin.submit_job({"latents": latents, "per_class": 1})["state"] in ("queued", "running", "done")


def test_a_job_that_runs_out_of_disk_waits_and_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old code: a job that ran out of disk failed for good, where a round retries once there is space."""
    real = jobs_module.StreamingSafetensors.write
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def full_once(self: Any, *args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        real(self, *args, **kwargs)

    monkeypatch.setattr(jobs_module.StreamingSafetensors, "write", full_once)
    with TestClient(create_app(make_settings(tmp_path / "data"))) as http:
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        job = admin.submit_job({"latents": torch.randn(2, 256).tolist(), "per_class": 2})
        done = admin.wait_for_job(job["id"], timeout=60, poll=0.02)
        assert done["state"] == "done" and done["error"] is None, done
        assert admin.job_result(job["id"])["images"].shape[0] == 4 and not failures


def test_finished_jobs_are_deletable_and_expire_after_the_retention(tmp_path: Path) -> None:
    """Old code: finished job results could not be deleted and piled up."""
    settings = make_settings(tmp_path / "data", job_retention_s=3600)
    with TestClient(create_app(settings)) as http:
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        service = http.app.state.service  # type: ignore[attr-defined]
        ids = [admin.submit_job({"latents": torch.randn(1, 256).tolist()})["id"] for _ in range(2)]
        for job_id in ids:
            assert admin.wait_for_job(job_id, timeout=60, poll=0.02)["state"] == "done"
        path = service.store.job_result_path(ids[0])
        assert path.is_file() and service.store.file_record(path) is not None
        assert admin.cancel_job(ids[0])["state"] == "done"  # DELETE on a finished job deletes it
        assert not path.exists() and service.store.file_record(path) is None
        with pytest.raises(KtlApiError) as info:
            admin.job(ids[0])
        assert info.value.status == 404
        kept = service.store.job_result_path(ids[1])
        assert service.jobs.expire() == 0 and kept.is_file()  # younger than the retention
        service.jobs._expired_at = float("-inf")
        service.clock = service.jobs.clock = lambda: time.time() + 7200  # two hours on
        assert service.jobs.expire() == 1 and not kept.exists()
        assert service.store.jobs_finished_before(time.time() + 1e9) == []


def test_repair_keeps_a_cancelled_round_cancelled(tmp_path: Path) -> None:
    """Old code: ``ktl admin check --repair`` rebuilt a cancelled round with uploads as one whose step is
    due, and the server ran it again."""
    from ktl.api.check import check_data_dir
    from ktl.api.store import DB_NAME

    settings = make_settings(tmp_path / "data")
    with TestClient(create_app(settings)) as http:
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        fed = admin.create_federation({"method": "fedproto", "num_classes": 10, "quorum": 3})
        (a,) = register(admin, http, fed["id"], 1)
        a.upload(fed["id"], 1, protos([0, 1]))
        admin.cancel_round(fed["id"], 1)
    for suffix in ("", "-wal", "-shm"):  # the database is lost
        Path(f"{settings.data_dir / DB_NAME}{suffix}").unlink(missing_ok=True)
    assert check_data_dir(settings.data_dir, repair=True).ok
    with TestClient(create_app(settings)) as http:
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        first = admin.round(fed["id"], 1)
        assert first["state"] == "failed" and first["error"] == "cancelled by the operator", first
        assert first["uploads"] == 1 and admin.federation(fed["id"])["current_round"] == 2
        assert admin.round(fed["id"], 2)["state"] == "open"
