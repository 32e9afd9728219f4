"""Round lifecycle through the API: quorum, deadline, pairs, failures, joining and leaving."""

from __future__ import annotations

import errno
import logging
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from ktl import inspect as ki
from ktl.api.service import KtlService
from ktl.api.worker import ROUND_PRIORITY
from ktl.clients import simplex_etf
from ktl.clients.sdk import KtlApiError
from ktl.errors import InsufficientStorageError
from ktl.methods import KnowledgeTransferServer
from ktl.quality import QUALITY_FILE, REPORT_KEYS, VERDICTS
from ktl.records import Pairs
from tests.api.conftest import ADMIN, FAST_ALIGNER, auth, federation, protos, register, wait_for


def test_quorum_closes_the_round_and_pairs_are_published(http, service, admin) -> None:
    names = [f"name-{c}" for c in range(10)]
    fed = federation(admin, quorum=2, class_names=names)
    a, b = register(admin, http, fed["id"], 2)
    a.upload(fed["id"], 1, protos([0, 1, 2]))
    assert a.round(fed["id"], 1)["state"] == "open"
    with pytest.raises(KtlApiError) as info:
        a.pairs(fed["id"], 1)
    assert info.value.status == 409 and info.value.reason == "round_not_published"
    answer = b.upload(fed["id"], 1, protos([2, 5], seed=1))
    assert answer["state"] == "aligning" and answer["uploads"] == 2
    assert admin.federation(fed["id"])["current_round"] == 2  # the next round opens at once
    state = wait_for(a, fed["id"], 1, ("published",))
    assert state["uploads"] == 2 and sorted(state["clients"]) == sorted(
        c.id for c in service.store.list_clients(fed["id"])
    )
    assert (
        state["stats"]["rows"] == 5 and state["stats"]["align_loss_last"] < state["stats"]["align_loss_first"]
    )
    pairs = b.pairs(fed["id"], 1)
    assert isinstance(pairs, Pairs) and pairs.class_ids.tolist() == [0, 1, 2, 5]
    assert pairs.images.shape == (4, 3, 32, 32) and pairs.latents.shape == (4, 256)
    png = a.pairs_png(fed["id"], 1)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ktl_uploads_total 2.0" in http.get("/metrics").text


def test_deadline_closes_a_round_with_an_upload_but_not_an_empty_one(
    http, service, admin, monkeypatch
) -> None:
    fed = federation(admin, quorum=5, round_deadline_s=60)
    (a,) = register(admin, http, fed["id"], 1)
    clock = service.rounds.clock
    monkeypatch.setattr(service.rounds, "clock", lambda: clock() + 61)  # the injected clock, not a sleep
    # round 1 is past its deadline with no upload: it stays open
    assert service.rounds.close_due() == 0
    assert a.round(fed["id"], 1)["state"] == "open"
    a.upload(fed["id"], 1, protos([4]))
    state = wait_for(a, fed["id"], 1, ("published",))
    assert state["uploads"] == 1 and state["closed_at"] >= state["deadline_at"]
    assert a.round(fed["id"], 2)["state"] == "open"


def test_unknown_round_is_404_naming_the_current_round(http, admin) -> None:
    fed = federation(admin)
    with pytest.raises(KtlApiError) as info:
        admin.round(fed["id"], 7)
    assert (
        info.value.status == 404
        and info.value.reason == "unknown_round"
        and info.value.body["current_round"] == 1
    )


def test_clients_join_and_leave_between_rounds(http, service, admin) -> None:
    fed = federation(admin, quorum=2)
    a, b = register(admin, http, fed["id"], 2)
    a.upload(fed["id"], 1, protos([0]))
    b.upload(fed["id"], 1, protos([1]))
    wait_for(a, fed["id"], 1, ("published",))
    # b leaves, c joins: round 2 still needs two uploads.
    b_id = service.store.list_clients(fed["id"])[1].id
    admin.remove_client(fed["id"], b_id)
    (c,) = register(admin, http, fed["id"], 1)
    with pytest.raises(KtlApiError) as info:
        b.upload(fed["id"], 2, protos([1]))
    assert info.value.status == 401
    a.upload(fed["id"], 2, protos([0], seed=3))
    c.upload(fed["id"], 2, protos([3], seed=4))
    state = wait_for(a, fed["id"], 2, ("published",))
    assert b_id not in state["clients"] and len(state["clients"]) == 2
    assert admin.federation(fed["id"])["clients"] == 2


def test_aligner_is_warm_across_rounds(http, service, admin) -> None:
    fed = federation(admin, quorum=1)
    (a,) = register(admin, http, fed["id"], 1)
    firsts = []
    for r in (1, 2):
        a.upload(fed["id"], r, protos([0, 1, 2, 3]))
        firsts.append(wait_for(a, fed["id"], r, ("published",))["stats"]["align_loss_first"])
    assert firsts[1] < firsts[0]
    assert service.store.state_snapshots(fed["id"]) == [1, 2]


def test_a_failed_alignment_marks_the_round_failed_and_the_next_round_proceeds(
    http, service, admin, monkeypatch
) -> None:
    fed = federation(admin, quorum=1)
    (a,) = register(admin, http, fed["id"], 1)
    original = KnowledgeTransferServer.round_steps

    def explode(self, uploads, *, round_index):  # type: ignore[no-untyped-def]
        yield  # one slice, then the failure
        raise RuntimeError("injected failure")

    monkeypatch.setattr(KnowledgeTransferServer, "round_steps", explode)
    a.upload(fed["id"], 1, protos([0]))
    state = wait_for(a, fed["id"], 1, ("failed",))
    assert "injected failure" in state["error"]
    with pytest.raises(KtlApiError) as info:
        a.pairs(fed["id"], 1)
    assert info.value.reason == "round_not_published"
    monkeypatch.setattr(KnowledgeTransferServer, "round_steps", original)
    a.upload(fed["id"], 2, protos([0]))
    assert wait_for(a, fed["id"], 2, ("published", "failed"))["state"] == "published"


def test_a_step_whose_failure_cannot_be_recorded_runs_again_instead_of_aligning_forever(
    http, service, admin, monkeypatch, caplog
) -> None:
    """A full disk at the worst moment: publishing fails, then recording the failure fails too. The round
    must not stay aligning with nothing working on it (a chaos soak found this): the scheduler queues its
    step again and it publishes."""
    fed = federation(admin, quorum=1, aligner=FAST_ALIGNER)
    (a,) = register(admin, http, fed["id"], 1)
    publish, fail = service.store.publish_round, service.store.fail_round
    calls = {"publish": 0, "fail": 0}

    def publish_once_out_of_space(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["publish"] += 1
        if calls["publish"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return publish(*args, **kwargs)

    def fail_out_of_space(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["fail"] += 1
        if calls["fail"] == 1:
            raise InsufficientStorageError("the change")
        return fail(*args, **kwargs)

    monkeypatch.setattr(service.store, "publish_round", publish_once_out_of_space)
    monkeypatch.setattr(service.store, "fail_round", fail_out_of_space)
    with caplog.at_level(logging.WARNING, logger="ktl.api.services.rounds"):
        a.upload(fed["id"], 1, protos([0, 1]))
        state = wait_for(a, fed["id"], 1, ("published", "failed"), timeout=30)
    assert state["state"] == "published" and calls == {"publish": 2, "fail": 1}, (state, calls)
    assert any("no server step queued" in r.getMessage() for r in caplog.records)
    assert service.rounds.reconcile() == 0  # nothing left to queue


def test_a_round_has_one_server_step_in_flight_at_most(http, service, admin) -> None:
    fed = federation(admin, quorum=1, aligner=FAST_ALIGNER)
    (a,) = register(admin, http, fed["id"], 1)
    release = threading.Event()
    service.worker.submit(ROUND_PRIORITY, lambda: release.wait(30) and None)  # hold the worker
    a.upload(fed["id"], 1, protos([0]))  # queues round 1's step behind the held task
    assert not service.rounds.enqueue(fed["id"], 1)  # already queued: not twice
    assert service.rounds.reconcile() == 0
    release.set()
    assert wait_for(a, fed["id"], 1, ("published", "failed"))["state"] == "published"
    service.worker.wait_idle(30)  # "published" is visible just before the step's last task returns
    assert service.rounds.enqueue(fed["id"], 1)  # a published round's step ends at once, queued once more
    service.worker.wait_idle(30)
    assert service.rounds.reconcile() == 0 and a.round(fed["id"], 1)["state"] == "published"


def test_federation_read_access_and_etf(http, admin) -> None:
    fed = federation(admin, num_classes=5, proto_dim=8, etf_seed=11)
    other = federation(admin)
    (a,) = register(admin, http, fed["id"], 1)
    (stranger,) = register(admin, http, other["id"], 1)
    got = a.federation(fed["id"], include_etf=True)
    assert got["etf_seed"] == 11 and got["proto_dim"] == 8 and got["current_round"] == 1
    etf = torch.tensor(got["etf"])
    assert etf.shape == (8, 5)
    torch.testing.assert_close(etf, simplex_etf(5, 8, seed=11))
    assert a.federation(fed["id"])["etf"] is None
    with pytest.raises(KtlApiError) as info:
        stranger.federation(fed["id"])
    not_yours = (info.value.status, info.value.reason, str(info.value).replace(fed["id"], "ID"))
    with pytest.raises(KtlApiError) as info:
        stranger.federation("fed-000000000000")
    not_there = (info.value.status, info.value.reason, str(info.value).replace("fed-000000000000", "ID"))
    assert not_yours == not_there and not_yours[:2] == (404, "unknown_federation")  # one answer for both
    assert len(http.get("/v1/federations", headers=auth(ADMIN)).json()) == 2
    assert (
        http.get("/v1/federations", headers=auth(a._headers["Authorization"].split()[1])).status_code == 401
    )


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"num_classes": 1}, "validation"),
        ({"num_classes": 10, "proto_dim": 5}, "validation"),
        ({"num_classes": 3, "class_names": ["a"]}, "validation"),
        ({"num_classes": 10, "quorum": 0}, "validation"),
        ({"num_classes": 10, "aligner": {"bandwidth_multipliers": [-1.0]}}, "validation"),
        ({"num_classes": 10, "unknown": 1}, "validation"),
        ({"num_classes": 10, "generator": "stylegan-xl"}, "unknown_generator"),
    ],
)
def test_bad_federation_specs_are_rejected(
    http: TestClient, service: KtlService, spec: dict, reason: str
) -> None:
    response = http.post("/v1/federations", json=spec, headers=auth(ADMIN))
    assert response.status_code == 422 and response.json()["error"]["reason"] == reason
    assert service.store.list_federations() == []


def test_admin_routes_need_the_admin_token(http, admin) -> None:
    fed = federation(admin)
    (a,) = register(admin, http, fed["id"], 1)
    client_token = a._headers["Authorization"].split()[1]
    for method, path in [
        ("POST", "/v1/federations"),
        ("POST", f"/v1/federations/{fed['id']}/clients"),
        ("GET", f"/v1/federations/{fed['id']}/clients"),
        ("POST", "/v1/jobs"),
    ]:
        for headers, reason in [
            ({}, "missing_token"),
            (auth(client_token), "bad_token"),
            (auth("nope"), "bad_token"),
        ]:
            response = http.request(method, path, headers=headers, json={})
            assert response.status_code == 401 and response.json()["error"]["reason"] == reason, (
                method,
                path,
            )
    assert [
        c["name"] for c in http.get(f"/v1/federations/{fed['id']}/clients", headers=auth(ADMIN)).json()
    ] == ["c0"]


def test_leftovers_of_a_crash_are_removed_at_start_up(tmp_path) -> None:
    from ktl.api.store import Store

    root = tmp_path / "data"
    store = Store(root)
    junk = [
        root / "federations/f/rounds/1/uploads/.x.safetensors.ab12.tmp",
        root / "jobs/.job-1.safetensors.partial",
    ]
    staged = root / "federations/f/state/.staging-1234"
    keep = root / "federations/f/rounds/1/pairs.safetensors"
    for path in [*junk, keep]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"x")
    store.close()
    Store(root).close()
    assert not any(p.exists() for p in junk) and not staged.exists() and keep.exists()


def test_the_etf_is_served_as_safetensors_at_any_size_and_as_json_only_when_small(http, admin) -> None:
    import torch

    from ktl.clients import simplex_etf

    small = federation(admin, num_classes=5, proto_dim=8, etf_seed=11)
    torch.testing.assert_close(
        admin.etf(small["id"]), torch.tensor(admin.federation(small["id"], include_etf=True)["etf"])
    )
    big = federation(admin, num_classes=100, proto_dim=1000, etf_seed=3, quorum=1)
    with pytest.raises(KtlApiError) as info:  # 100 000 values: not as JSON
        admin.federation(big["id"], include_etf=True)
    assert (info.value.status, info.value.reason) == (422, "etf_too_large") and "/etf" in info.value.message
    etf = admin.etf(big["id"])
    assert etf.shape == (1000, 100) and etf.dtype == torch.float32
    torch.testing.assert_close(etf, simplex_etf(100, 1000, seed=3).float(), rtol=0, atol=0)


def test_client_tokens_never_start_with_a_dash(http, admin) -> None:
    """A token is passed on command lines (``ktl client run --token T``): one starting with "-" would be
    taken for an option. 64 registrations: a bare ``token_urlsafe`` starts with "-" in 1/64 of them."""
    fed = federation(admin)
    tokens = [admin.register_client(fed["id"])["token"] for _ in range(64)]
    assert all(t.startswith("ktl_") for t in tokens) and len(set(tokens)) == 64


def test_a_published_fedktl_round_carries_its_quality_report_and_picture(http, service, admin) -> None:
    fed = federation(admin, quorum=1)
    (a,) = register(admin, http, fed["id"], 1)
    a.upload(fed["id"], 1, protos([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]))
    state = wait_for(a, fed["id"], 1, ("published",))
    quality = state["quality"]
    assert tuple(quality) == REPORT_KEYS and quality["verdict"] in VERDICTS
    assert quality["kid"] is not None and quality["mmd_ratio"] > 0  # 10 images: enough for the KID
    assert state["stats"]["quality_mmd_ratio"] == quality["mmd_ratio"]
    assert a.round(fed["id"], 2)["quality"] is None  # the open round
    png = a.request("GET", f"/v1/federations/{fed['id']}/rounds/1/quality.png")
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    view = ki.ServerView(a, fed["id"])
    assert ki.load_quality(view, 1) == quality and view.quality_png(1) == png.content
    assert http.get(f"/v1/federations/{fed['id']}/rounds/1/quality.png").status_code == 401  # as pairs.png
    history = a.request("GET", f"/v1/federations/{fed['id']}/rounds/1/align-history").json()
    assert len(history["loss"]) == len(history["mmd"]) == len(history["mse"]) == FAST_ALIGNER["steps"]
    assert history["loss"][-1] == state["stats"]["align_loss_last"]
    # A damaged report is left out of the round state (which clients poll), never an error.
    (service.store.round_dir(fed["id"], 1) / QUALITY_FILE).write_text("{}")
    assert a.round(fed["id"], 1)["quality"] is None


def test_methods_without_a_quality_report_show_null_and_no_picture(http, admin) -> None:
    fed = admin.create_federation({"num_classes": 10, "quorum": 1, "method": "fedproto", "etf_seed": 0})
    (a,) = register(admin, http, fed["id"], 1)
    a.upload(fed["id"], 1, protos([0, 1, 2]))
    assert wait_for(a, fed["id"], 1, ("published",))["quality"] is None
    with pytest.raises(KtlApiError) as info:
        a.request("GET", f"/v1/federations/{fed['id']}/rounds/1/quality.png")
    assert info.value.status == 404 and info.value.reason == "not_published_by_method"
    with pytest.raises(KtlApiError) as info:
        a.request("GET", f"/v1/federations/{fed['id']}/rounds/1/align-history")
    assert info.value.status == 404
