"""The operator's controls: pages of federations and clients, pause/resume, cancel a round, delete a
federation, and a poison round given up after a bounded number of attempts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ktl.api import create_app
from ktl.clients.sdk import KtlApiError, KtlHttpClient
from tests.api.conftest import ADMIN, FAST_ALIGNER, make_settings, protos, register, wait_for


def test_federations_and_clients_are_listed_a_page_at_a_time(http: TestClient, admin: KtlHttpClient) -> None:
    made = [admin.create_federation({"num_classes": 10, "method": "fedproto"})["id"] for _ in range(5)]
    first = http.get("/v1/federations?limit=2", headers={"Authorization": f"Bearer {ADMIN}"})
    assert [f["id"] for f in first.json()] == made[:2] and 'rel="next"' in first.headers["link"]
    seen, after = [], None
    while True:
        page = admin.federations(limit=2, after=after)
        seen += [f["id"] for f in page]
        if len(page) < 2:
            break
        after = page[-1]["id"]
    assert seen == made
    last = http.get(f"/v1/federations?limit=2&after={made[3]}", headers={"Authorization": f"Bearer {ADMIN}"})
    assert [f["id"] for f in last.json()] == [made[4]] and "link" not in last.headers
    with pytest.raises(KtlApiError) as info:
        admin.federations(limit=2, after="fed-nope")
    assert info.value.status == 404
    register(admin, http, made[0], 3)
    clients = http.get(
        f"/v1/federations/{made[0]}/clients?limit=2", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert len(clients.json()) == 2 and 'rel="next"' in clients.headers["link"]


def test_a_paused_federation_refuses_uploads_and_holds_its_rounds_until_resumed(
    http: TestClient, service: Any, admin: KtlHttpClient
) -> None:
    fed = admin.create_federation(
        {"num_classes": 10, "quorum": 3, "round_deadline_s": 60, "aligner": FAST_ALIGNER}
    )  # a deadline no loaded machine reaches by itself; the injected clock passes it below
    a, b = register(admin, http, fed["id"], 2)
    a.upload(fed["id"], 1, protos([0]))
    assert admin.pause_federation(fed["id"])["spec"]["method"] == "fedktl"
    with pytest.raises(KtlApiError) as info:
        b.upload(fed["id"], 1, protos([1]))
    assert (info.value.status, info.value.reason) == (409, "federation_paused")
    clock = service.rounds.clock
    service.rounds.clock = lambda: clock() + 61  # past the deadline (the injected clock, not a sleep)
    service.rounds.close_due()
    assert admin.round(fed["id"], 1)["state"] == "open" and admin.round(fed["id"], 1)["uploads"] == 1
    admin.resume_federation(fed["id"])
    assert (
        wait_for(a, fed["id"], 1, ("published", "failed"))["state"] == "published"
    )  # the deadline closes it


def test_the_operator_cancels_an_aligning_round_and_the_federation_goes_on(tmp_path: Path) -> None:
    # max_align_seconds: the 40 000-step step is admitted however slow this CPU measures (the test stops it)
    settings = make_settings(tmp_path / "data", align_slice_seconds=0.02, max_align_seconds=3600)
    with TestClient(create_app(settings)) as http:
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        fed = admin.create_federation(
            {"num_classes": 10, "quorum": 1, "aligner": {**FAST_ALIGNER, "steps": 40_000}}
        )
        (a,) = register(admin, http, fed["id"], 1)
        a.upload(fed["id"], 1, protos([0, 1]))
        assert wait_for(a, fed["id"], 1, ("aligning", "published", "failed"))["state"] == "aligning"
        with pytest.raises(KtlApiError) as info:  # nothing is deleted while a round is being computed
            admin.delete_federation(fed["id"])
        assert (info.value.status, info.value.reason) == (409, "round_aligning")
        cancelled = admin.cancel_round(fed["id"], 1)
        assert cancelled["state"] == "failed" and "cancelled by the operator" in cancelled["error"]
        with pytest.raises(KtlApiError) as info:
            admin.cancel_round(fed["id"], 1)
        assert (info.value.status, info.value.reason) == (409, "round_finished")
        a.upload(fed["id"], 2, protos([2]))  # the step of round 1 stopped: round 2 is computed
        assert wait_for(a, fed["id"], 2, ("aligning", "published", "failed"))["state"] == "aligning"
        admin.cancel_round(fed["id"], 2)
        admin.delete_federation(fed["id"])
        with pytest.raises(KtlApiError) as info:
            admin.federation(fed["id"])
        assert info.value.status == 404
        assert not (tmp_path / "data" / "federations" / fed["id"]).exists()


def test_a_graceful_stop_during_a_step_does_not_count_as_an_attempt(tmp_path: Path) -> None:
    """Attempts count the starts of a round's step that never finished because the server died (the OOM
    poison round of test_device_fairness.py); a step stopped by a graceful shutdown runs again at
    start-up without spending one, however often the operator restarts."""
    settings = make_settings(  # max_align_seconds: admitted however slow this CPU measures
        tmp_path / "data", align_slice_seconds=0.02, max_round_attempts=1, max_align_seconds=3600
    )
    with TestClient(create_app(settings)) as http:
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        fed = admin.create_federation(
            {"num_classes": 10, "quorum": 1, "aligner": {**FAST_ALIGNER, "steps": 40_000}}
        )
        (a,) = register(admin, http, fed["id"], 1)
        a.upload(fed["id"], 1, protos([0, 1]))
        # attempt 1 is under way; a graceful stop
        assert wait_for(a, fed["id"], 1, ("aligning", "published", "failed"))["state"] == "aligning"
    for _ in range(2):
        with TestClient(create_app(settings)) as http:
            admin = KtlHttpClient("", ADMIN, http=http, retries=0)
            state = wait_for(admin, fed["id"], 1, ("aligning", "published", "failed"))["state"]
            assert state == "aligning"  # running again, not given up
            attempts = http.app.state.service.store._query(  # type: ignore[attr-defined]
                "SELECT attempts FROM rounds WHERE federation_id = ? AND round = 1", (fed["id"],)
            )[0][0]
            assert attempts == 1  # this life's start only
    with TestClient(create_app(settings)) as http:
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        admin.cancel_round(fed["id"], 1)
