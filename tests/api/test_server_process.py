"""Against a real ``ktl serve`` process on loopback: concurrency, job progress, kill -9 and restart."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from ktl.api.process import ServeProcess
from ktl.clients.sdk import KtlHttpClient
from ktl.records import Prototypes
from tests.api.conftest import ADMIN, FAST_ALIGNER, protos


@pytest.fixture
def server_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[ServeProcess] = []
    fast = {"KTL_DEVICE": "cpu", "KTL_SCHEDULER_INTERVAL_S": "0.05", "KTL_RATE_LIMIT_PER_MINUTE": "1000000",
            "KTL_RATE_LIMIT_BURST": "100000"}  # fmt: skip

    def make(data_dir: Path | None = None, **env: str) -> ServeProcess:
        server = ServeProcess(
            data_dir or tmp_path / "data", ADMIN, log=tmp_path / "server.log", **fast, **env
        )
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


def wait(
    client: KtlHttpClient, fid: str, r: int, states: tuple[str, ...], timeout: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (state := client.round(fid, r))["state"] not in states:
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    return state


def test_twenty_concurrent_clients_several_rounds_nothing_lost_and_job_progress(server_factory) -> None:
    server = server_factory(KTL_JOB_BATCH_SIZE="16", KTL_JOB_PROGRESS_INTERVAL_S="0")
    admin = KtlHttpClient(server.url, ADMIN)
    fed = admin.create_federation({"num_classes": 10, "quorum": 20, "aligner": FAST_ALIGNER})
    fid = fed["id"]
    tokens = [admin.register_client(fid, f"c{i}")["token"] for i in range(20)]
    rounds = 3

    def participant(i: int) -> list[str]:
        acks = []
        with KtlHttpClient(server.url, tokens[i], timeout=60) as sdk:
            for r in range(1, rounds + 1):
                classes = sorted({(i + k) % 10 for k in range(1 + i % 4)})
                answer = sdk.upload(fid, r, protos(classes, seed=100 * r + i))
                acks.append(answer["client_id"])
                assert sdk.wait_for_round(fid, r, timeout=120)["state"] == "published"
                assert len(sdk.pairs(fid, r)) >= 1
        return acks

    with ThreadPoolExecutor(max_workers=20) as pool:
        acked = list(pool.map(participant, range(20)))
    for r in range(1, rounds + 1):
        state = admin.round(fid, r)
        assert state["state"] == "published" and state["uploads"] == 20
        assert sorted(state["clients"]) == sorted(a[r - 1] for a in acked)  # every acknowledged upload is in
    metrics = httpx.get(f"{server.url}/metrics").text
    assert f"ktl_uploads_total {20.0 * rounds}" in metrics

    job = admin.submit_job({"federation_id": fid, "per_class": 40, "spread": 0.3})
    progress = []
    while (state := admin.job(job["id"]))["state"] not in ("done", "failed"):
        progress.append(state["done"])
        time.sleep(0.02)
    assert state["state"] == "done" and state["done"] == state["total"] == 400
    assert progress == sorted(progress) and len(set(progress)) >= 2  # observed moving
    assert admin.job_result(job["id"])["images"].shape == (400, 3, 32, 32)


def test_kill_9_mid_round_and_mid_job_then_restart_loses_nothing(server_factory, tmp_path: Path) -> None:
    server = server_factory(KTL_JOB_BATCH_SIZE="8", KTL_JOB_PROGRESS_INTERVAL_S="0")
    admin = KtlHttpClient(server.url, ADMIN)
    # A: an open round with 6 of 10 uploads acknowledged.
    fed_a = admin.create_federation({"num_classes": 10, "quorum": 10, "aligner": FAST_ALIGNER})
    tokens_a = [admin.register_client(fed_a["id"])["token"] for _ in range(10)]
    sent: dict[str, Prototypes] = {}
    for i in range(6):
        p = protos([i, (i + 3) % 10], seed=i)
        sent[KtlHttpClient(server.url, tokens_a[i]).upload(fed_a["id"], 1, p)["client_id"]] = p
    # A running job, then B: a round that closes and is aligning when the process dies.
    job = admin.submit_job({"latents": torch.randn(2, 256).tolist(), "per_class": 2000})
    while admin.job(job["id"])["done"] == 0:
        time.sleep(0.02)
    fed_b = admin.create_federation(
        {"num_classes": 10, "quorum": 2, "aligner": {**FAST_ALIGNER, "steps": 400}}
    )
    for i in range(2):
        token = admin.register_client(fed_b["id"])["token"]
        KtlHttpClient(server.url, token).upload(fed_b["id"], 1, protos([i], seed=50 + i))
    assert admin.round(fed_b["id"], 1)["state"] == "aligning"
    assert admin.job(job["id"])["state"] == "running"

    server.kill9()
    server = server_factory(server.data_dir, KTL_JOB_BATCH_SIZE="8", KTL_JOB_PROGRESS_INTERVAL_S="0")
    admin = KtlHttpClient(server.url, ADMIN)

    state_a = admin.round(fed_a["id"], 1)
    assert state_a["state"] == "open" and sorted(state_a["clients"]) == sorted(sent)
    store_root = server.data_dir / "federations" / fed_a["id"] / "rounds" / "1" / "uploads"
    for client_id, p in sent.items():  # the bytes on disk are the acknowledged prototypes
        on_disk = Prototypes.from_bytes((store_root / f"{client_id}.safetensors").read_bytes())
        torch.testing.assert_close(on_disk.vectors, p.vectors.half().float())
    for i in range(6, 10):
        KtlHttpClient(server.url, tokens_a[i]).upload(fed_a["id"], 1, protos([i], seed=i))
    assert wait(admin, fed_a["id"], 1, ("published", "failed"))["state"] == "published"
    assert wait(admin, fed_b["id"], 1, ("published", "failed"))["state"] == "published"
    final = admin.wait_for_job(job["id"], timeout=300, poll=0.1)
    assert final["state"] == "done" and final["restarts"] == 1 and final["done"] == 4000
    assert admin.job_result(job["id"])["images"].shape[0] == 4000


@pytest.mark.slow  # make test-all (make test keeps kill -9 mid round and mid job)
def test_kill_9_during_fedproto_and_fedtgp_rounds_recovers_like_fedktl(server_factory) -> None:
    """The table methods keep every guarantee: acknowledged uploads survive kill -9, a round that was
    being computed is computed again after the restart, and the broadcast is the method's."""
    from ktl.methods import class_mean_table

    server = server_factory()
    admin = KtlHttpClient(server.url, ADMIN)
    proto = admin.create_federation({"num_classes": 10, "quorum": 4, "method": "fedproto"})
    tokens = [admin.register_client(proto["id"])["token"] for _ in range(4)]
    sent = {}
    for i in range(2):  # 2 of 4 uploads acknowledged when the process dies
        p = protos([i, (i + 5) % 10], seed=i)
        sent[KtlHttpClient(server.url, tokens[i]).upload(proto["id"], 1, p)["client_id"]] = p
    tgp = admin.create_federation(  # a long server step, running at the kill
        {"num_classes": 10, "quorum": 1, "method": "fedtgp", "baseline": {"tgp_steps": 6_000}}
    )
    tgp_token = admin.register_client(tgp["id"])["token"]
    KtlHttpClient(server.url, tgp_token).upload(tgp["id"], 1, protos([1, 2, 3], seed=9))
    assert admin.round(tgp["id"], 1)["state"] == "aligning"

    server.kill9()
    server = server_factory(server.data_dir)
    admin = KtlHttpClient(server.url, ADMIN)
    state = admin.round(proto["id"], 1)
    assert state["state"] == "open" and sorted(state["clients"]) == sorted(sent)
    for i in range(2, 4):
        p = protos([i], seed=i)
        sent[KtlHttpClient(server.url, tokens[i]).upload(proto["id"], 1, p)["client_id"]] = p
    assert wait(admin, proto["id"], 1, ("published", "failed"))["state"] == "published"
    table = Prototypes.from_bytes(KtlHttpClient(server.url, tokens[0]).broadcast(proto["id"], 1))
    half = {cid: Prototypes(p.vectors.half().float(), p.class_ids, p.counts) for cid, p in sent.items()}
    means, counts = class_mean_table(half, 10)
    present = (counts > 0).nonzero().flatten()
    assert table.class_ids.tolist() == present.tolist()
    torch.testing.assert_close(table.vectors.float(), means[present], atol=1e-3, rtol=0)  # fp16 table
    assert wait(admin, tgp["id"], 1, ("published", "failed"), timeout=300)["state"] == "published"
