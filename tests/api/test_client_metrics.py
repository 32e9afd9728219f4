"""How the federation learns: clients' metrics with their uploads, summed per round; the jobs listing;
the federation's state for the operator's buttons."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from ktl.api import create_app
from ktl.api.process import ServerThread, free_port
from ktl.api.services.evaluation import parse_upload_metrics, summarize
from ktl.api.store import Store
from ktl.cli import main
from ktl.clients.sdk import KtlApiError, KtlHttpClient
from ktl.demo import DemoOptions, run_demo
from tests.api.conftest import (
    ADMIN,
    FAST_ALIGNER,
    auth,
    federation,
    make_settings,
    octet,
    protos,
    register,
    wait_for,
)

# Three clients' evaluations of one round: (n_samples, accuracy, loss).
REPORTS = [(100, 0.5, 1.25), (300, 0.9, 0.5), (50, 0.2, 2.0)]


def _weighted(values: list[float], weights: list[int]) -> tuple[float, float]:
    total = sum(weights)
    mean = sum(w * v for v, w in zip(values, weights, strict=True)) / total
    var = sum(w * (v - mean) ** 2 for v, w in zip(values, weights, strict=True)) / total
    return mean, math.sqrt(var)


def test_the_round_summarises_its_clients_metrics_sample_weighted(http, admin) -> None:
    fed = federation(admin, quorum=4)
    fid = fed["id"]
    clients = register(admin, http, fid, 4)
    for i, (sdk, (n, acc, loss)) in enumerate(zip(clients, REPORTS, strict=False)):
        sdk.upload(fid, 1, protos([0, 1, 2], seed=i), metrics={"n_samples": n, "accuracy": acc, "loss": loss})
    clients[3].upload(fid, 1, protos([3, 4], seed=9))  # no metrics: counted in no summary

    state = admin.round(fid, 1)
    weights = [n for n, _, _ in REPORTS]
    for name, column in (("accuracy", 1), ("loss", 2)):
        values = [rep[column] for rep in REPORTS]
        mean, std = _weighted(values, weights)
        got = state["metrics"][name]
        assert got["mean"] == pytest.approx(mean, rel=1e-12)
        assert got["std"] == pytest.approx(std, rel=1e-9)
        assert (got["min"], got["max"]) == (min(values), max(values))
        assert (got["clients"], got["n_samples"]) == (3, 450)
    # PFLlib's accuracy: Σ correct / Σ tested over the clients.
    correct = sum(n * acc for n, acc, _ in REPORTS)
    assert state["metrics"]["accuracy"]["mean"] == pytest.approx(correct / 450, rel=1e-12)

    # The learning curve lists every round so far, with its metrics ({} where nobody reported).
    wait_for(admin, fid, 1, ("published",))
    curve = admin.metrics(fid)
    assert curve["current_round"] == 2
    assert [(r["round"], r["state"]) for r in curve["rounds"]] == [(1, "published"), (2, "open")]
    assert curve["rounds"][0]["metrics"] == state["metrics"]
    assert curve["rounds"][1]["metrics"] == {}


def test_the_learning_curve_comes_a_page_at_a_time(http, admin) -> None:
    fid = federation(admin, quorum=1)["id"]
    (sdk,) = register(admin, http, fid, 1)
    for r in (1, 2, 3):
        sdk.upload(fid, r, protos([0, 1], seed=r), metrics={"n_samples": 10, "accuracy": r / 10})
        wait_for(admin, fid, r, ("published",))
    page = http.get(f"/v1/federations/{fid}/metrics?limit=2", headers=auth(admin_token(admin)))
    assert page.status_code == 200
    assert [r["round"] for r in page.json()["rounds"]] == [1, 2]
    assert "after=2" in page.headers["link"]
    rest = admin.metrics(fid, after=2, limit=2)
    assert [r["round"] for r in rest["rounds"]] == [3, 4]
    assert rest["rounds"][0]["metrics"]["accuracy"]["mean"] == pytest.approx(0.3)
    last = http.get(f"/v1/federations/{fid}/metrics?after=2&limit=2", headers=auth(admin_token(admin)))
    assert "link" not in last.headers  # round 4 is the current one: nothing follows
    # A client of the federation may read its curve too.
    assert sdk.metrics(fid)["federation_id"] == fid


def admin_token(admin) -> str:
    return admin._headers["Authorization"].removeprefix("Bearer ")


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ("not json", "body"),
        ('["accuracy", 0.5]', "body"),
        ('{"accuracy": 0.5}', "n_samples"),
        ('{"n_samples": 0, "accuracy": 0.5}', "n_samples"),
        ('{"n_samples": 2.5, "accuracy": 0.5}', "n_samples"),
        ('{"n_samples": true, "accuracy": 0.5}', "n_samples"),
        ('{"n_samples": "10", "accuracy": 0.5}', "n_samples"),
        ('{"n_samples": 10}', "body"),
        ('{"n_samples": 10, "accuracy": "0.5"}', "accuracy"),
        ('{"n_samples": 10, "accuracy": true}', "accuracy"),
        ('{"n_samples": 10, "accuracy": NaN}', "body"),
        ('{"n_samples": 10, "accuracy": Infinity}', "body"),
        ('{"n_samples": 10, "accuracy": 1e400}', "accuracy"),
        ('{"n_samples": 10, "accuracy": 1e13}', "accuracy"),
        ('{"n_samples": 10, "accuracy": 0.5, "accuracy": 0.9}', "accuracy"),
        ('{"n_samples": 10, "Accuracy": 0.5}', "Accuracy"),
        ('{"n_samples": 10, "acc": {"top1": 0.5}}', "acc"),
        (json.dumps({"n_samples": 10, **{f"m{i}": 0.1 for i in range(9)}}), "body"),
    ],
)
def test_bad_metrics_are_refused_naming_the_field_and_store_nothing(http, admin, header, field) -> None:
    fid = federation(admin, quorum=2)["id"]
    (sdk,) = register(admin, http, fid, 1)
    token = sdk._headers["Authorization"].removeprefix("Bearer ")
    body = protos([0, 1]).to_bytes(torch.float16)
    answer = http.post(
        f"/v1/federations/{fid}/rounds/1/prototypes",
        content=body,
        headers={**octet(token), "Ktl-Metrics": header},
    )
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["reason"] == "bad_metrics"
    assert error["field"] == field
    assert admin.round(fid, 1)["uploads"] == 0  # refused: nothing stored
    # The same upload with good metrics then goes through.
    assert sdk.upload(fid, 1, protos([0, 1]), metrics={"n_samples": 3, "accuracy": 1})["uploads"] == 1


def test_an_oversized_metrics_header_is_refused() -> None:
    with pytest.raises(Exception, match="at most 1024"):
        parse_upload_metrics(json.dumps({"n_samples": 1, "a": 0.1}) + " " * 1100)


def test_a_retried_upload_keeps_its_first_metrics(http, admin) -> None:
    fid = federation(admin, quorum=2)["id"]
    (sdk,) = register(admin, http, fid, 1)
    payload = protos([0, 1, 2])
    assert sdk.upload(fid, 1, payload, metrics={"n_samples": 10, "accuracy": 0.4})["duplicate"] is False
    again = sdk.upload(fid, 1, payload, metrics={"n_samples": 99, "accuracy": 0.9})
    assert again["duplicate"] is True  # the same upload: nothing changed, its metrics included
    summary = admin.round(fid, 1)["metrics"]["accuracy"]
    assert (summary["mean"], summary["n_samples"], summary["clients"]) == (0.4, 10, 1)


def test_jobs_are_listed_newest_first_a_page_at_a_time(http, admin) -> None:
    ids = [
        admin.submit_job({"latents": torch.randn(1, 256).tolist(), "per_class": 1})["id"] for _ in range(3)
    ]
    for job_id in ids:
        admin.wait_for_job(job_id, timeout=60, poll=0.01)
    first = http.get("/v1/jobs?limit=2", headers=auth(admin_token(admin)))
    assert [j["id"] for j in first.json()] == ids[::-1][:2]
    assert f"after={ids[1]}" in first.headers["link"]
    rest = admin.jobs(after=ids[1])
    assert [j["id"] for j in rest] == [ids[0]]
    assert rest[0]["state"] == "done"
    with pytest.raises(KtlApiError) as info:
        admin.jobs(after="job-nope")
    assert (info.value.status, info.value.reason) == (404, "unknown_job")
    (client,) = register(admin, http, federation(admin)["id"], 1)
    with pytest.raises(KtlApiError) as info:
        client.jobs()
    assert info.value.status == 401  # the operator's listing


def test_the_federation_says_its_state_for_the_operators_buttons(http, service, admin, monkeypatch) -> None:
    fid = federation(admin, quorum=1)["id"]
    assert (admin.federation(fid)["state"], admin.federation(fid)["aligning_round"]) == ("active", None)
    assert admin.pause_federation(fid)["state"] == "paused"
    assert [f["state"] for f in admin.federations() if f["id"] == fid] == ["paused"]
    assert admin.resume_federation(fid)["state"] == "active"
    # A closed round whose server step has not run yet (held back here): the federation names it, and
    # deleting is refused until it ends.
    monkeypatch.setattr(service.rounds, "enqueue", lambda fid, r: False)
    (sdk,) = register(admin, http, fid, 1)
    sdk.upload(fid, 1, protos([0]))
    assert admin.federation(fid)["aligning_round"] == 1
    with pytest.raises(KtlApiError) as info:
        admin.delete_federation(fid)
    assert (info.value.status, info.value.reason) == (409, "round_aligning")
    admin.cancel_round(fid, 1)
    assert admin.federation(fid)["aligning_round"] is None


def test_client_run_reports_its_accuracy_and_every_client_command_reads_ktl_url(
    tmp_path, monkeypatch, capsys
) -> None:
    thread = ServerThread(create_app(make_settings(tmp_path / "data")), "127.0.0.1", free_port()).start()
    try:
        admin = KtlHttpClient(thread.url, ADMIN)
        fid = admin.create_federation({"num_classes": 10, "quorum": 1, "aligner": FAST_ALIGNER})["id"]
        monkeypatch.setenv("KTL_URL", thread.url)  # no --url anywhere below
        monkeypatch.setenv("KTL_TOKEN", admin.register_client(fid)["token"])
        assert main(["client", "status", "--federation", fid]) == 0
        assert json.loads(capsys.readouterr().out)["id"] == fid
        run = [
            "client",
            "run",
            "--federation",
            fid,
            "--client-index",
            "0",
            "--preset",
            "smoke",
            "--wait",
            "120",
        ]
        assert main(run) == 0
        reported = admin.round(fid, 1)["metrics"]
        assert "accuracy" in reported  # the client's evaluation after its local training
        assert reported["accuracy"]["clients"] == 1 and reported["accuracy"]["n_samples"] > 0
        assert 0.0 <= reported["accuracy"]["mean"] <= 1.0
        err = capsys.readouterr().err
        shown = re.search(r"round 1: local accuracy (\S+) \((\d+) test samples\)", err)
        assert shown is not None, err
        assert float(shown[1]) == pytest.approx(reported["accuracy"]["mean"], abs=1e-4)
        assert int(shown[2]) == reported["accuracy"]["n_samples"]
        monkeypatch.delenv("KTL_URL")
        with pytest.raises(SystemExit):  # without it, --url is required again
            main(["client", "status", "--federation", fid])
    finally:
        thread.stop()


def test_the_demo_s_clients_report_what_the_demo_prints(tmp_path) -> None:
    """ktl demo's clients send their accuracy with each upload: the server's sample-weighted mean over
    them is the demo's own accuracy (Σ correct / Σ tested, PFLlib's figure)."""
    result = run_demo(
        DemoOptions(rounds=1, clients=2, preset="smoke", out=tmp_path / "demo", method="fedproto")
    )
    store = Store(tmp_path / "demo" / "server", maintenance=True)
    try:
        summary = summarize(store.metric_sums(str(result["federation"]), 1, 1))[1]
    finally:
        store.close()
    assert summary["accuracy"]["clients"] == 2
    # Both are float sums over the same counts, in another order: equal to rounding.
    assert summary["accuracy"]["mean"] == pytest.approx(result["accuracy"][0], rel=1e-12)
