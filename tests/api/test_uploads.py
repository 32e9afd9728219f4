"""Every way an upload can be refused: the status, the machine-readable reason, and nothing stored."""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from ktl.api.service import KtlService
from ktl.clients.sdk import KtlApiError, KtlHttpClient
from tests.api.conftest import ADMIN, auth, federation, make_settings, octet, protos, register

UPLOAD = "/v1/federations/{fid}/rounds/{r}/prototypes"


def snapshot(service: KtlService, fid: str) -> dict[str, Any]:
    """Everything an upload could change: rounds, uploads and files on disk."""
    fed = service.store.get_federation(fid)
    assert fed is not None
    files = sorted(str(p.relative_to(service.store.root)) for p in service.store.root.rglob("*.safetensors"))
    rounds = [service.store.get_round(fid, r) for r in range(1, fed.current_round + 1)]
    uploads = [service.store.uploads(fid, r) for r in range(1, fed.current_round + 1)]
    return {"current": fed.current_round, "rounds": rounds, "uploads": uploads, "files": files}


@pytest.fixture
def fed(admin: KtlHttpClient) -> dict[str, Any]:
    return federation(admin, quorum=3)


@pytest.fixture
def tokens(admin: KtlHttpClient, http: TestClient, fed: dict[str, Any]) -> list[str]:
    return [admin.register_client(fed["id"], f"c{i}")["token"] for i in range(3)]


def post(http: TestClient, fid: str, r: int, body: bytes, headers: dict[str, str]) -> Any:
    return http.post(UPLOAD.format(fid=fid, r=r), content=body, headers=headers)


def assert_rejected(response: Any, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["reason"] == reason, error
    assert error["message"]
    return dict(error)


def test_accepted_upload_then_identical_again_is_idempotent(http, service, fed, tokens) -> None:
    body = protos([0, 1, 2]).to_bytes(torch.float16)
    first = post(http, fed["id"], 1, body, octet(tokens[0]))
    assert first.status_code == 201 and first.json()["duplicate"] is False and first.json()["uploads"] == 1
    before = snapshot(service, fed["id"])
    again = post(http, fed["id"], 1, body, octet(tokens[0]))
    assert again.status_code == 200 and again.json()["duplicate"] is True and again.json()["uploads"] == 1
    assert snapshot(service, fed["id"]) == before


def test_json_upload_is_the_same_upload_as_safetensors(http, service, fed, tokens) -> None:
    p = protos([3, 4])
    as_json = {
        "prototypes": p.vectors.tolist(),
        "class_ids": p.class_ids.tolist(),
        "counts": p.counts.tolist(),
    }
    first = http.post(UPLOAD.format(fid=fed["id"], r=1), json=as_json, headers=auth(tokens[0]))
    assert first.status_code == 201
    again = post(http, fed["id"], 1, p.to_bytes(torch.float32), octet(tokens[0]))
    assert again.status_code == 200 and again.json()["duplicate"] is True


def _bad_bodies() -> list[tuple[str, int, str, bytes, str]]:
    good = protos([0, 1, 2])
    v, c, n = good.vectors, good.class_ids, good.counts

    def st(**tensors: torch.Tensor) -> bytes:
        return save({k: t.contiguous() for k, t in tensors.items()})

    nan = v.clone()
    nan[0, 0] = float("nan")
    inf = v.clone()
    inf[1, 2] = float("inf")
    return [
        (
            "wrong K",
            422,
            "dim",
            st(prototypes=torch.nn.functional.normalize(torch.randn(3, 7), dim=1), class_ids=c, counts=n),
            "octet",
        ),
        (
            "integer prototypes",
            422,
            "dtype",
            st(prototypes=torch.ones(3, 10, dtype=torch.int64), class_ids=c, counts=n),
            "octet",
        ),
        ("float64 prototypes", 422, "dtype", st(prototypes=v.double(), class_ids=c, counts=n), "octet"),
        ("int32 class ids", 422, "dtype", st(prototypes=v, class_ids=c.int(), counts=n), "octet"),
        ("1-D prototypes", 422, "shape", st(prototypes=v[0], class_ids=c, counts=n), "octet"),
        ("NaN", 422, "non_finite", st(prototypes=nan, class_ids=c, counts=n), "octet"),
        ("Inf", 422, "non_finite", st(prototypes=inf, class_ids=c, counts=n), "octet"),
        ("norms far from 1", 422, "norm", st(prototypes=v * 1.5, class_ids=c, counts=n), "octet"),
        (
            "class id ≥ C",
            422,
            "class_range",
            st(prototypes=v, class_ids=torch.tensor([0, 1, 10]), counts=n),
            "octet",
        ),
        (
            "negative class id",
            422,
            "class_range",
            st(prototypes=v, class_ids=torch.tensor([-1, 1, 2]), counts=n),
            "octet",
        ),
        (
            "repeated class id",
            422,
            "class_repeated",
            st(prototypes=v, class_ids=torch.tensor([1, 1, 2]), counts=n),
            "octet",
        ),
        ("zero count", 422, "counts", st(prototypes=v, class_ids=c, counts=torch.tensor([3, 0, 1])), "octet"),
        (
            "negative count",
            422,
            "counts",
            st(prototypes=v, class_ids=c, counts=torch.tensor([3, -2, 1])),
            "octet",
        ),
        ("missing tensor", 400, "missing_tensor", st(prototypes=v, class_ids=c), "octet"),
        (
            "extra tensor",
            400,
            "unexpected_tensor",
            st(prototypes=v, class_ids=c, counts=n, extra=n.clone()),
            "octet",
        ),
        ("not safetensors", 400, "not_safetensors", b"this is not a safetensors file", "octet"),
        ("a pickle", 400, "not_safetensors", pickle.dumps({"prototypes": v}), "octet"),
        ("empty body", 400, "not_safetensors", b"", "octet"),
        ("JSON syntax", 400, "bad_json", b'{"prototypes": [[1, 2]', "json"),
        ("JSON structure", 400, "bad_json", json.dumps({"vectors": [[1.0]]}).encode(), "json"),
        (
            "JSON ragged",
            422,
            "shape",
            json.dumps({"prototypes": [[1.0, 0.0], [1.0]], "class_ids": [0, 1], "counts": [1, 1]}).encode(),
            "json",
        ),
        (
            "JSON empty",
            422,
            "empty",
            json.dumps({"prototypes": [], "class_ids": [], "counts": []}).encode(),
            "json",
        ),
        (
            "JSON huge id",
            400,
            "bad_json",
            json.dumps({"prototypes": v.tolist(), "class_ids": [0, 1, 2**70], "counts": n.tolist()}).encode(),
            "json",
        ),
    ]


@pytest.mark.parametrize(
    ("case", "status", "reason", "body", "kind"), _bad_bodies(), ids=[b[0] for b in _bad_bodies()]
)
def test_bad_payloads_are_rejected_and_nothing_is_stored(
    http, service, fed, tokens, case, status, reason, body, kind
) -> None:
    post(http, fed["id"], 1, protos([5]).to_bytes(), octet(tokens[1]))  # some state to protect
    before = snapshot(service, fed["id"])
    content_type = "application/octet-stream" if kind == "octet" else "application/json"
    response = post(http, fed["id"], 1, body, {**auth(tokens[0]), "Content-Type": content_type})
    assert_rejected(response, status, reason)
    assert snapshot(service, fed["id"]) == before


def test_auth_and_federation_errors(http, service, admin, fed, tokens) -> None:
    other = federation(admin, quorum=1)
    other_token = admin.register_client(other["id"], "x")["token"]
    body = protos([0]).to_bytes()
    before = snapshot(service, fed["id"])
    assert_rejected(
        post(http, fed["id"], 1, body, {"Content-Type": "application/octet-stream"}), 401, "missing_token"
    )
    assert_rejected(post(http, fed["id"], 1, body, octet("not-a-token")), 401, "bad_token")
    assert_rejected(post(http, fed["id"], 1, body, octet(other_token)), 404, "unknown_federation")
    assert_rejected(post(http, "fed-unknown", 1, body, octet(tokens[0])), 404, "unknown_federation")
    assert_rejected(post(http, fed["id"], 1, body, octet(ADMIN)), 403, "client_token_required")
    assert snapshot(service, fed["id"]) == before
    assert not service.store.uploads(other["id"], 1)


def test_removed_client_token_stops_working(http, service, admin, fed, tokens) -> None:
    clients = service.store.list_clients(fed["id"])
    admin.remove_client(fed["id"], clients[0].id)
    assert_rejected(post(http, fed["id"], 1, protos([0]).to_bytes(), octet(tokens[0])), 401, "bad_token")


def test_media_type_and_size_limits(http, service, fed, tokens) -> None:
    body = protos([0, 1]).to_bytes()
    before = snapshot(service, fed["id"])
    assert_rejected(
        post(http, fed["id"], 1, body, {**auth(tokens[0]), "Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert_rejected(
        post(http, fed["id"], 1, body, auth(tokens[0]) | {"Content-Type": ""}), 415, "unsupported_media_type"
    )
    limit = service.settings.max_upload_bytes
    assert_rejected(post(http, fed["id"], 1, b"\0" * (limit + 1), octet(tokens[0])), 413, "too_large")

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(limit // 65536 + 2):
            yield b"\0" * 65536

    streamed = http.post(UPLOAD.format(fid=fed["id"], r=1), content=chunks(), headers=octet(tokens[0]))
    assert_rejected(streamed, 413, "too_large")
    assert snapshot(service, fed["id"]) == before


def test_second_different_upload_conflicts(http, service, fed, tokens) -> None:
    assert post(http, fed["id"], 1, protos([0, 1], seed=1).to_bytes(), octet(tokens[0])).status_code == 201
    before = snapshot(service, fed["id"])
    error = assert_rejected(
        post(http, fed["id"], 1, protos([0, 1], seed=2).to_bytes(), octet(tokens[0])),
        409,
        "conflicting_upload",
    )
    assert error["current_round"] == 1
    assert snapshot(service, fed["id"]) == before


def test_late_and_early_uploads_name_the_current_round(http, service, admin, fed, tokens) -> None:
    for i, token in enumerate(tokens):  # quorum 3: round 1 closes, round 2 opens
        assert post(http, fed["id"], 1, protos([i]).to_bytes(), octet(token)).status_code == 201
    service.worker.wait_idle(60)
    assert service.store.get_round(fed["id"], 1).state == "published"
    latecomer = admin.register_client(fed["id"], "late")["token"]  # joined after round 1 closed
    before = snapshot(service, fed["id"])
    late = assert_rejected(
        post(http, fed["id"], 1, protos([7]).to_bytes(), octet(latecomer)), 409, "round_closed"
    )
    assert late["current_round"] == 2 and "current round is 2" in late["message"]
    early = assert_rejected(
        post(http, fed["id"], 3, protos([7]).to_bytes(), octet(tokens[0])), 409, "round_not_open"
    )
    assert early["current_round"] == 2
    assert snapshot(service, fed["id"]) == before


def test_round_index_must_be_positive(http, fed, tokens) -> None:
    assert_rejected(post(http, fed["id"], 0, protos([0]).to_bytes(), octet(tokens[0])), 422, "validation")


def test_rate_limit_answers_429_with_retry_after(tmp_path) -> None:
    from ktl.api import create_app

    app = create_app(make_settings(tmp_path / "d", rate_limit_per_minute=1, rate_limit_burst=2))
    with TestClient(app) as http:
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        fed = federation(admin, quorum=5)
        (client,) = register(admin, http, fed["id"], 1)
        client.round(fed["id"], 1)
        client.round(fed["id"], 1)
        with pytest.raises(KtlApiError) as info:
            client.upload(fed["id"], 1, protos([0]))
        assert info.value.status == 429 and info.value.reason == "rate_limited"
        response = http.get(f"/v1/federations/{fed['id']}/rounds/1", headers=client._headers)
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
        assert app.state.service.store.uploads(fed["id"], 1) == []
        # The admin is not rate limited.
        assert admin.round(fed["id"], 1)["uploads"] == 0


def test_rejects_are_counted_by_reason(http, fed, tokens) -> None:
    post(http, fed["id"], 1, b"junk", octet(tokens[0]))
    post(http, fed["id"], 1, b"junk", octet(tokens[0]))
    text = http.get("/metrics").text
    assert 'ktl_upload_rejects_total{reason="not_safetensors"} 2.0' in text
    assert "ktl_bytes_received_total 8.0" in text


def test_retry_of_the_upload_that_closed_the_round_is_still_idempotent(http, service, admin) -> None:
    # The SDK retries when an answer is lost; the retried upload may arrive after its first copy closed
    # the round. It must get 200 (duplicate), not 409: the client's upload *was* accepted.
    fed = federation(admin, quorum=1)
    token = admin.register_client(fed["id"], "solo")["token"]
    body = protos([0, 1]).to_bytes()
    first = post(http, fed["id"], 1, body, octet(token))
    assert first.status_code == 201 and first.json()["state"] == "aligning"
    assert service.store.get_federation(fed["id"]).current_round == 2
    again = post(http, fed["id"], 1, body, octet(token))
    assert again.status_code == 200 and again.json()["duplicate"] is True and again.json()["uploads"] == 1
    different = post(http, fed["id"], 1, protos([0, 1], seed=9).to_bytes(), octet(token))
    assert_rejected(different, 409, "conflicting_upload")
    assert len(service.store.uploads(fed["id"], 1)) == 1
