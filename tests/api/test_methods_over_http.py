"""Every method over HTTP: the federation's spec picks the method, its uploads are that method's payloads,
its broadcast is what `Method.server_update` makes, and clients take it with `Method.client_receive`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from ktl.api import create_app
from ktl.clients import LocalClient
from ktl.clients.sdk import KtlApiError, KtlHttpClient
from ktl.config import build_config
from ktl.data import build_federated_data
from ktl.methods import Method, load_method
from ktl.participant import method_for_federation, take_broadcast, train_and_upload
from ktl.records import Pairs, Prototypes, Weights
from ktl.simulate import build_client
from tests.api.conftest import FAST_ALIGNER, make_settings, register

METHOD_SPECS: dict[str, dict[str, Any]] = {
    "fedktl": {"aligner": FAST_ALIGNER},
    "fedktl-latents": {"aligner": FAST_ALIGNER},
    "fedproto": {},
    "fedtgp": {"baseline": {"tgp_steps": 20}},
    "fd": {},
    # the HtFLlib baselines with a trainable classifier, their server steps kept short
    "lg-fedavg": {},
    "fedgh": {"fedgh": {"server_epochs": 2}},
    "fedgen": {"fedgen": {"server_steps": 5, "hidden_dim": 16}},
    "fml": {},
    "fedkd": {},
    "fedmrl": {},
}
# whose broadcast is weights (`ktl.records.Weights`): a classifier, a generator, a shared model
WEIGHTS_BROADCAST = {"lg-fedavg", "fedgh", "fedgen", "fml", "fedkd", "fedmrl"}
SLOW_OVER_HTTP = {"fml", "fedkd", "fedmrl"}  # each client trains a second (shared) CNN


def smoke_clients(fed: dict[str, Any], n: int) -> list[LocalClient]:
    """``n`` clients of the smoke preset against the federation's ETF, as ktl simulate builds them."""
    config = build_config(preset="smoke", overrides={"num_clients": n})
    data = build_federated_data(config.data, num_clients=n, seed=config.seed)
    etf = torch.tensor(fed["etf"])
    return [build_client(config, data, i, etf, torch.device("cpu")) for i in range(n)]


def run_rounds(
    admin: KtlHttpClient, http: TestClient, fed: dict[str, Any], rounds: int, n: int = 2
) -> tuple[Method, list[LocalClient], list[KtlHttpClient]]:
    fed = admin.federation(fed["id"], include_etf=True)
    clients = smoke_clients(fed, n)
    sdks = register(admin, http, fed["id"], n)
    method = method_for_federation(fed, seed=0, device=torch.device("cpu"))
    for r in range(1, rounds + 1):
        for client, sdk in zip(clients, sdks, strict=True):
            train_and_upload(method, client, sdk, fed["id"], r)
        taken = [
            take_broadcast(method, c, s, fed["id"], r, timeout=60) for c, s in zip(clients, sdks, strict=True)
        ]
        assert all(taken)
    return method, clients, sdks


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_OVER_HTTP else n for n in sorted(METHOD_SPECS)],
)
def test_every_method_runs_over_http_create_upload_publish_broadcast(
    http: TestClient, service: Any, admin: KtlHttpClient, name: str
) -> None:
    fed = admin.create_federation({"num_classes": 10, "quorum": 2, "method": name, **METHOD_SPECS[name]})
    assert fed["method"] == name and fed["spec"]["method"] == name
    assert fed["broadcast_file"] == service.federations.get(fed["id"]).spec.method_class.broadcast_file
    method, clients, sdks = run_rounds(admin, http, fed, rounds=2)
    state = admin.round(fed["id"], 2)
    assert state["state"] == "published" and state["uploads"] == 2 and state["bytes_received"] > 0
    # a retry of an acknowledged upload changes nothing, even after the round closed (the stored copy is
    # its canonical float32 form: the same upload)
    first_client = service.store.list_clients(fed["id"])[0].id  # registered first, as sdks[0]
    retry = sdks[0].upload_bytes(fed["id"], 2, service.store.load_uploads(fed["id"], 2)[first_client])
    assert retry["duplicate"] and admin.round(fed["id"], 2)["uploads"] == 2
    sent_before = service.metrics.bytes_out._value.get()
    broadcast = sdks[0].broadcast(fed["id"], 2)
    assert service.metrics.bytes_out._value.get() - sent_before == len(broadcast)  # bytes counted
    stored = service.store.round_dir(fed["id"], 2) / fed["broadcast_file"]
    assert broadcast == stored.read_bytes()
    # The broadcast is the method's own: recompute the server step from the stored uploads, warm from
    # round 1's state snapshot, and get the same bytes.
    record = service.federations.get(fed["id"])
    again = load_method(service.store.state_dir(fed["id"], 1), service.federations.method_context(record))
    assert again.server_update(service.store.load_uploads(fed["id"], 2), 2).payload == broadcast
    if name == "fedktl":
        assert len(Pairs.from_bytes(broadcast)) >= 1 and "align_loss_last" in state["stats"]
        assert sdks[0].pairs_png(fed["id"], 2)[:4] == b"\x89PNG"
        assert all(c._pairs is not None for c in clients)
    elif name in WEIGHTS_BROADCAST:
        sent = Weights.from_bytes(broadcast)
        assert sent.num_samples >= 1 and sent.tensors
        # every client took it: its classifier (or shared model) is the broadcast's
        if name in ("lg-fedavg", "fedgh"):
            for client in clients:
                assert client.model.classifier is not None
                torch.testing.assert_close(client.model.classifier.weight.detach(), sent.tensors["weight"])
    else:
        table = Prototypes.from_bytes(broadcast)  # a global table (fedktl-latents: class latents, W = 256)
        assert table.vectors.shape[1] == (256 if name == "fedktl-latents" else 10)
        assert table.class_ids.numel() >= 1
        with pytest.raises(KtlApiError) as info:
            sdks[0].pairs_png(fed["id"], 2)
        assert info.value.status == 404 and info.value.reason == "not_published_by_method"
    if name in ("fedproto", "fedtgp", "fd"):
        assert set(method.tables) == {c.client_id for c in clients}  # type: ignore[attr-defined]
        assert state["stats"]["classes_in_table"] >= 1


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"method": "fedproto", "aligner": FAST_ALIGNER}, "do not apply to method 'fedproto'"),
        ({"method": "fedktl", "baseline": {"lam": 2.0}}, "do not apply to method 'fedktl'"),
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"method": "local"}, "exchanges nothing"),
        ({"method": "fd", "privacy": {"epsilon": 4.0, "rounds": 3}}, "not available for method 'fd'"),
        ({"method": "fedproto", "privacy": {"epsilon": 4.0}}, "privacy.rounds is required"),
        ({"method": "fedproto", "baseline": {"lam": -1}}, "baseline.lam"),
        (
            {"method": "fedmrl", "fedmrl": {"sub_dim": 11}},
            "fedmrl.sub_dim 11 exceeds the representation's K = 10",
        ),
    ],
)
def test_a_spec_the_method_cannot_take_is_refused_with_its_reason_and_nothing_is_stored(
    http: TestClient, service: Any, admin: KtlHttpClient, spec: dict[str, Any], words: str
) -> None:
    with pytest.raises(KtlApiError) as info:
        admin.create_federation({"num_classes": 10, **spec})
    assert info.value.status == 422 and words in info.value.message
    assert service.store.list_federations() == []


def test_a_federation_shows_the_settings_in_force_for_its_method(admin: KtlHttpClient) -> None:
    fed = admin.create_federation({"num_classes": 10, "method": "fedtgp", "baseline": {"tgp_steps": 7}})
    spec = fed["spec"]
    assert spec["baseline"]["tgp_steps"] == 7 and spec["baseline"]["lam"] == 1.0  # defaults filled in
    assert spec["privacy"]["epsilon"] is None  # the sections FedTGP does not read are not shown
    assert spec.get("fedktl") is None and spec.get("aligner") is None
    assert fed["generator"] is None and fed["privacy"] is None
    old_style = admin.create_federation({"num_classes": 10, "fedktl": {"mu": 2.0}})  # no "method": fedktl
    assert old_style["method"] == "fedktl" and old_style["spec"]["fedktl"]["mu"] == 2.0
    assert old_style["generator"]["latent_dim"] == 256


def test_each_method_validates_its_own_uploads(http: TestClient, admin: KtlHttpClient) -> None:
    fd = admin.create_federation({"num_classes": 10, "method": "fd"})
    proto = admin.create_federation({"num_classes": 10, "method": "fedproto"})
    (a,) = register(admin, http, fd["id"], 1)
    (b,) = register(admin, http, proto["id"], 1)
    cosines = Prototypes(torch.full((2, 10), 0.2), torch.tensor([0, 1]), torch.tensor([3, 4]))
    assert a.upload(fd["id"], 1, cosines)["uploads"] == 1  # mean cosines need not be unit vectors …
    with pytest.raises(KtlApiError) as info:
        b.upload(proto["id"], 1, cosines)  # … prototypes must be
    assert (info.value.status, info.value.reason) == (422, "norm")
    (a2,) = register(admin, http, fd["id"], 1)
    too_big = Prototypes(torch.full((1, 10), 1.5), torch.tensor([2]), torch.tensor([1]))
    with pytest.raises(KtlApiError) as info:
        a2.upload(fd["id"], 1, too_big)
    assert (info.value.status, info.value.reason) == (422, "range")
    # a weights method takes its own payload only: a prototype table is refused, a classifier of another
    # shape too
    lg = admin.create_federation({"num_classes": 10, "method": "lg-fedavg"})
    (c,) = register(admin, http, lg["id"], 1)
    with pytest.raises(KtlApiError) as info:
        c.upload(lg["id"], 1, cosines)
    assert (info.value.status, info.value.reason) == (400, "unexpected_tensor")
    wrong = Weights({"weight": torch.zeros(10, 9), "bias": torch.zeros(10)}, torch.tensor([5]))
    with pytest.raises(KtlApiError) as info:
        c.upload_bytes(lg["id"], 1, wrong.to_bytes())
    assert (info.value.status, info.value.reason) == (422, "layout")


def test_privacy_over_http_noises_the_upload_and_the_federation_accounts_epsilon(
    http: TestClient, admin: KtlHttpClient
) -> None:
    budget = {"epsilon": 8.0, "rounds": 2}
    private = admin.create_federation({"num_classes": 10, "method": "fedproto", "privacy": budget})
    plain = admin.create_federation({"num_classes": 10, "method": "fedproto"})
    assert private["privacy"]["epsilon"] == 8.0 and private["privacy"]["epsilon_spent"] == 0.0
    uploads = {}
    for fed in (private, plain):
        fed = admin.federation(fed["id"], include_etf=True)
        (client,) = smoke_clients(fed, 1)
        method = method_for_federation(fed, seed=0, device=torch.device("cpu"))
        uploads[fed["id"]] = method.client_update(client, 1).payload
        (sdk,) = register(admin, http, fed["id"], 1)
        sdk.upload_bytes(fed["id"], 1, uploads[fed["id"]])
    noisy = Prototypes.from_bytes(uploads[private["id"]])
    clean = Prototypes.from_bytes(uploads[plain["id"]])
    assert noisy.class_ids.tolist() == clean.class_ids.tolist()
    assert not torch.equal(noisy.vectors, clean.vectors) and noisy.counts.tolist() == [1] * len(noisy.counts)
    after_one = admin.federation(private["id"])["privacy"]
    assert after_one["releases"] == 1 and 0 < after_one["epsilon_spent"] < 8.0
    # round 3 is past the budget: refused, storing nothing
    (sdk,) = register(admin, http, private["id"], 1)
    with pytest.raises(KtlApiError) as info:
        sdk.upload_bytes(private["id"], 3, uploads[private["id"]])
    assert (info.value.status, info.value.reason) == (409, "privacy_budget_spent")
    assert admin.federation(private["id"])["privacy"]["releases"] == 1


def test_a_restarted_server_continues_fedtgp_warm_from_its_saved_state(tmp_path: Path) -> None:
    """FedTGP's trainable prototypes and Adam moments are the method's state: a server restarted between
    rounds publishes the same round 2 as one that kept running."""
    spec = {"num_classes": 10, "quorum": 2, "method": "fedtgp", "baseline": {"tgp_steps": 20}, "etf_seed": 0}
    broadcasts = []
    for restart in (False, True):
        torch.manual_seed(0)
        data = tmp_path / f"restart-{restart}"
        with TestClient(create_app(make_settings(data))) as http:
            admin = KtlHttpClient("", "admin-secret-for-tests", http=http, retries=0)
            fed = admin.federation(admin.create_federation(spec)["id"], include_etf=True)
            clients = smoke_clients(fed, 2)
            sdks = register(admin, http, fed["id"], 2)
            method = method_for_federation(fed, seed=0, device=torch.device("cpu"))
            tokens = [s._headers for s in sdks]
            for client, sdk in zip(clients, sdks, strict=True):
                train_and_upload(method, client, sdk, fed["id"], 1)
            for client, sdk in zip(clients, sdks, strict=True):
                assert take_broadcast(method, client, sdk, fed["id"], 1, timeout=60)
            if not restart:
                for client, sdk in zip(clients, sdks, strict=True):
                    train_and_upload(method, client, sdk, fed["id"], 2)
                sdks[0].wait_for_round(fed["id"], 2, timeout=60)
                broadcasts.append(sdks[0].broadcast(fed["id"], 2))
                continue
        with TestClient(create_app(make_settings(data))) as http:
            sdks = [KtlHttpClient("", "", http=http, retries=0) for _ in tokens]
            for sdk, headers in zip(sdks, tokens, strict=True):
                sdk._headers = headers
            for client, sdk in zip(clients, sdks, strict=True):
                train_and_upload(method, client, sdk, fed["id"], 2)
            sdks[0].wait_for_round(fed["id"], 2, timeout=60)
            broadcasts.append(sdks[0].broadcast(fed["id"], 2))
    assert broadcasts[0] == broadcasts[1]
