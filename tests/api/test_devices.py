"""Several devices: one worker each, rounds on the first, a batch job's batches on all of them, the same
result bytes whatever the device count; cancel and failure with batches in flight on two workers; jobs
left with nothing working on them are re-queued; the ``devices`` setting. Two CPU "devices" stand in for
two GPUs."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from ktl.api import create_app, load_settings
from ktl.api.jobs import StreamingSafetensors, WriterClosedError
from ktl.api.schemas import JobSpec
from ktl.api.service import KtlService
from ktl.api.settings import resolve_devices
from ktl.api.worker import JOB_PRIORITY, ROUND_PRIORITY, DevicePool
from ktl.cli import main
from ktl.clients.sdk import KtlHttpClient
from ktl.errors import ConfigError, InsufficientStorageError
from tests.api.conftest import ADMIN, make_settings

TWO = ["cpu", "cpu"]


@contextmanager
def server(data_dir: Path, **overrides: Any) -> Iterator[tuple[KtlService, KtlHttpClient, TestClient]]:
    if "devices" in overrides:
        overrides.setdefault("device", None)  # make_settings names one device, cpu
    app = create_app(make_settings(data_dir, **overrides))
    with TestClient(app) as http:
        yield app.state.service, KtlHttpClient("", ADMIN, http=http, retries=0), http


def wrap_synthesize(service: KtlService, wrapper: Callable[[int, Any, torch.Tensor], torch.Tensor]) -> None:
    """Replace each device's default generator's ``synthesize`` by ``wrapper(device index, original, z)``."""
    for i, generators in enumerate(service.device_generators):
        original = generators["default"].synthesize
        generators["default"].synthesize = lambda z, i=i, original=original: wrapper(i, original, z)


def metric(http: TestClient, line: str) -> bool:
    return line in http.get("/metrics").text.splitlines()


LATENTS = torch.randn(5, 256, generator=torch.Generator().manual_seed(0)).tolist()
SPEC = {"latents": LATENTS, "per_class": 9, "spread": 0.3, "seed": 11}  # 45 images, 12 batches of 4


def test_two_devices_give_the_same_bytes_as_one_and_both_run_batches(tmp_path: Path) -> None:
    with server(tmp_path / "one", job_batch_size=4) as (one, admin, _):
        job = admin.wait_for_job(admin.submit_job(SPEC)["id"], timeout=60, poll=0.01)
        assert job["state"] == "done"
        expected = one.store.job_result_path(job["id"]).read_bytes()
        assert len(one.devices) == 1 and set(one.jobs.batches_by_device) == {0}

    with server(tmp_path / "two", devices=TWO, job_batch_size=4) as (two, admin, http):
        assert [str(d) for d in two.devices] == TWO and len(two.pool.workers) == 2
        assert two.device_generators[0]["default"] is not two.device_generators[1]["default"]  # a copy each
        used: dict[int, set[str]] = {0: set(), 1: set()}

        def slow(i: int, original: Any, z: torch.Tensor) -> torch.Tensor:
            used[i].add(threading.current_thread().name)
            time.sleep(0.01)  # both workers get batches even when one would be quick enough alone
            return original(z)

        wrap_synthesize(two, slow)
        job = admin.wait_for_job(admin.submit_job(SPEC)["id"], timeout=60, poll=0.01)
        assert job["state"] == "done" and job["done"] == 45
        assert two.store.job_result_path(job["id"]).read_bytes() == expected
        batches = two.jobs.batches_by_device
        assert batches[0] > 0 and batches[1] > 0 and batches[0] + batches[1] == 12, batches
        assert used == {0: {"ktl-device-0"}, 1: {"ktl-device-1"}}  # each worker its own device's copy
        assert metric(http, 'ktl_jobs_total{outcome="done"} 1.0')
        assert metric(http, "ktl_images_generated_total 45.0")
        ready = http.get("/readyz").json()
        assert ready["devices"] == TWO and ready["device"] == "cpu"
        assert not two.jobs.in_flight(job["id"])


def test_rounds_stay_on_the_first_device_while_jobs_use_the_others(tmp_path: Path) -> None:
    with server(tmp_path / "d", devices=TWO, job_batch_size=2) as (service, admin, _):
        release = threading.Event()
        service.worker.submit(ROUND_PRIORITY, lambda: release.wait(30) and None)  # a long round slice
        job = admin.wait_for_job(admin.submit_job(SPEC)["id"], timeout=60, poll=0.01)
        assert job["state"] == "done"  # the second device ran the whole job
        assert service.jobs.batches_by_device[1] > 0 and service.jobs.batches_by_device[0] == 0
        release.set()
        assert service.worker.wait_idle(30)


def test_cancel_mid_way_with_two_devices_leaves_no_file(tmp_path: Path) -> None:
    with server(tmp_path / "d", devices=TWO, job_batch_size=1, job_progress_interval_s=0) as (
        service,
        admin,
        http,
    ):
        job = admin.submit_job({"latents": LATENTS[:1], "per_class": 3000})
        deadline = time.monotonic() + 30
        while admin.job(job["id"])["done"] < 6:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        admin.cancel_job(job["id"])
        assert service.pool.wait_idle(30)
        final = admin.job(job["id"])
        assert final["state"] == "cancelled" and final["done"] < 3000
        assert not service.store.job_result_path(job["id"]).exists()
        assert not list((tmp_path / "d" / "jobs").glob(".*partial"))
        assert metric(http, 'ktl_jobs_total{outcome="cancelled"} 1.0')
        assert not service.jobs.in_flight(job["id"])


def test_a_batch_that_raises_fails_the_job_once(tmp_path: Path) -> None:
    with server(tmp_path / "d", devices=TWO, job_batch_size=1) as (service, admin, http):
        calls = {0: 0, 1: 0}

        def boom(i: int, original: Any, z: torch.Tensor) -> torch.Tensor:
            calls[i] += 1
            time.sleep(0.005)
            if calls[0] + calls[1] >= 5:
                raise RuntimeError(f"device {i} broke")  # every later batch on either device raises too
            return original(z)

        wrap_synthesize(service, boom)
        job = admin.wait_for_job(
            admin.submit_job({"latents": LATENTS[:1], "per_class": 200})["id"], timeout=60, poll=0.01
        )
        assert service.pool.wait_idle(30)
        assert job["state"] == "failed" and "broke" in job["error"]
        assert metric(http, 'ktl_jobs_total{outcome="failed"} 1.0')
        assert admin.job(job["id"])["state"] == "failed"
        assert not service.store.job_result_path(job["id"]).exists()
        assert not list((tmp_path / "d" / "jobs").glob(".*partial"))
        assert not service.jobs.in_flight(job["id"])


def test_reconcile_requeues_a_job_stranded_in_running(tmp_path: Path) -> None:
    with server(tmp_path / "d", devices=TWO, job_batch_size=8) as (service, admin, _):
        spec = JobSpec.model_validate({"latents": LATENTS[:2], "per_class": 10})
        job = service.store.create_job(spec, 20, time.time())  # no task: as if it had been lost
        service.store.update_job(job.id, state="running", started_at=time.time(), done=8)
        assert service.jobs.reconcile(grace_s=60) == []  # seen stranded, but not for long enough yet
        assert service.jobs.reconcile(grace_s=0) == [job.id]
        done = admin.wait_for_job(job.id, timeout=60, poll=0.01)
        assert done["state"] == "done" and done["done"] == 20
        again = service.store.get_job(job.id)
        assert again is not None and again.restarts == 1
        assert service.jobs.reconcile(grace_s=0) == []  # nothing stranded any more

        # A job with a task in flight is left alone.
        release = threading.Event()
        for w in service.pool.workers:
            w.submit(ROUND_PRIORITY, lambda: release.wait(30) and None)
        queued = admin.submit_job({"latents": LATENTS[:1]})
        assert service.jobs.in_flight(queued["id"]) and service.jobs.reconcile(grace_s=0) == []
        release.set()
        assert admin.wait_for_job(queued["id"], timeout=60, poll=0.01)["state"] == "done"


def test_a_failure_that_cannot_be_recorded_is_reconciled(tmp_path: Path) -> None:
    """A batch fails and recording the failure fails too (a full disk): the job stays running with
    nothing working on it until `reconcile` restarts it."""
    with server(tmp_path / "d", devices=TWO, job_batch_size=4) as (service, admin, _):
        broken = {"left": 1}

        def once(i: int, original: Any, z: torch.Tensor) -> torch.Tensor:
            if broken["left"]:
                broken["left"] = 0
                raise RuntimeError("device lost")
            return original(z)

        def disk_full(job_id: str, error: str) -> None:
            raise InsufficientStorageError("insufficient_storage", "the server's disk is full")

        wrap_synthesize(service, once)
        real_failed = service.jobs._failed
        service.jobs._failed = disk_full
        job = admin.submit_job({"latents": LATENTS[:2], "per_class": 10})
        assert service.pool.wait_idle(30)
        stranded = service.store.get_job(job["id"])
        assert stranded is not None and stranded.state == "running"
        assert not service.jobs.in_flight(job["id"])
        assert not list((tmp_path / "d" / "jobs").glob(".*partial"))
        service.jobs._failed = real_failed
        assert service.jobs.reconcile(grace_s=0) == [job["id"]]
        assert admin.wait_for_job(job["id"], timeout=60, poll=0.01)["state"] == "done"


def test_pool_runs_shared_tasks_anywhere_and_pinned_tasks_in_priority_order() -> None:
    pool = DevicePool([torch.device("cpu")] * 3)
    pool.start()
    try:
        order: list[str] = []
        gate = threading.Event()
        pool.workers[0].submit(ROUND_PRIORITY, lambda: gate.wait(30) and None)
        ran: list[int] = []
        lock = threading.Lock()

        def shared(w: Any) -> None:
            with lock:
                ran.append(w.index)
            time.sleep(0.01)

        for _ in range(20):
            pool.submit_any(JOB_PRIORITY, shared)

        def note(what: str) -> None:
            order.append(what)

        pool.workers[0].submit(JOB_PRIORITY, partial(note, "job"))
        pool.workers[0].submit(ROUND_PRIORITY, partial(note, "round"))
        deadline = time.monotonic() + 30  # until the other workers have taken some (not a fixed sleep)
        while len(ran) < 5:
            assert time.monotonic() < deadline, ran
            time.sleep(0.01)
        assert 0 not in ran  # worker 0 is busy; the others take the shared tasks
        gate.set()
        assert pool.wait_idle(30)
        assert len(ran) == 20 and order[0] == "round"
    finally:
        pool.stop()
    assert not any(w.alive for w in pool.workers)


def test_writer_takes_batches_from_threads_in_any_order(tmp_path: Path) -> None:
    values = torch.arange(64 * 3, dtype=torch.float32).reshape(64, 3)
    writer = StreamingSafetensors(
        tmp_path / "r.safetensors",
        {"x": (torch.float32, (64, 3)), "i": (torch.int64, (64,))},
    )
    starts = list(range(0, 64, 4))
    random.Random(0).shuffle(starts)

    def write(start: int) -> None:
        writer.write("x", start, values[start : start + 4])
        writer.write("i", start, torch.arange(start, start + 4))

    threads = [threading.Thread(target=write, args=(s,)) for s in starts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.finish()
    from safetensors.torch import load_file

    data = load_file(tmp_path / "r.safetensors")
    assert torch.equal(data["x"], values) and data["i"].tolist() == list(range(64))
    writer.abort()  # after finish: leaves the file alone
    assert (tmp_path / "r.safetensors").is_file()
    with pytest.raises(WriterClosedError):
        writer.write("i", 0, torch.zeros(1, dtype=torch.int64))

    aborted = StreamingSafetensors(tmp_path / "a.safetensors", {"i": (torch.int64, (4,))})
    aborted.abort()
    aborted.abort()  # once is enough; twice is harmless
    with pytest.raises(WriterClosedError):
        aborted.finish()
    assert list(tmp_path.iterdir()) == [tmp_path / "r.safetensors"]


# -- settings ---------------------------------------------------------------------------------------------


def test_devices_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KTL_DEVICES", "cpu, cpu")
    settings = load_settings(admin_token=ADMIN)
    assert settings.devices == TWO and settings.device is None
    assert resolve_devices(settings) == [torch.device("cpu")] * 2
    monkeypatch.setenv("KTL_DEVICES", '["cpu"]')  # a JSON list too
    assert load_settings(admin_token=ADMIN).devices == ["cpu"]
    monkeypatch.setenv("KTL_DEVICES", "[cpu")
    with pytest.raises(ConfigError, match="devices"):
        load_settings(admin_token=ADMIN)
    monkeypatch.delenv("KTL_DEVICES")
    monkeypatch.setenv("KTL_DEVICE", "cpu")
    assert resolve_devices(load_settings(admin_token=ADMIN)) == [torch.device("cpu")]
    assert load_settings(admin_token=ADMIN, devices="cpu").devices == ["cpu"]  # agrees with KTL_DEVICE
    with pytest.raises(ConfigError, match="disagree"):
        load_settings(admin_token=ADMIN, devices="cpu,cpu")
    with pytest.raises(ConfigError, match="not a device"):
        load_settings(admin_token=ADMIN, devices="cpu,gpu0")


def test_default_devices_are_every_gpu_or_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KTL_DEVICE", "KTL_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(admin_token=ADMIN)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    expected = [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
    assert resolve_devices(settings) == expected


def test_serve_refuses_a_device_and_disagreeing_devices(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KTL_ADMIN_TOKEN", ADMIN)
    for name in ("KTL_DEVICE", "KTL_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", "--device", "cpu", "--devices", "cpu,cpu", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "disagree" in err and "--devices" in err and len(err.strip().splitlines()) == 1
