"""Specs are values (issue 23, item 1 and the duplicate-key/coercion findings of item 5): every number of
every spec is finite and in range, a body holds its own JSON types, a refused request stores nothing, and
a stored row the server cannot read is set aside instead of failing the listing and the start-up."""

from __future__ import annotations

import json
import sqlite3
import struct
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import BaseModel
from safetensors.torch import save as st_save

from ktl.api import create_app
from ktl.api.check import check_data_dir
from ktl.api.schemas import FederationSpec, JobSpec
from ktl.errors import PayloadError
from ktl.methods import METHODS, SECTIONS
from ktl.records import Prototypes
from tests.api.conftest import ADMIN, auth, make_settings

JSON = {**auth(ADMIN), "Content-Type": "application/json"}
NOT_FINITE = ("1e400", "-1e400", "Infinity", "NaN")
SERVED = [name for name, cls in METHODS.items() if cls.exchanges and cls.aggregation != "sum"]


def _is_float(annotation: Any) -> bool:
    if typing.get_origin(annotation) is tuple:
        return False
    return annotation is float or float in typing.get_args(annotation)


def _float_fields(model: type[BaseModel]) -> list[tuple[str, bool]]:
    """(name, is a tuple of floats) of every float field of ``model``."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if _is_float(ann):
            out.append((name, False))
        elif typing.get_origin(ann) is tuple and typing.get_args(ann)[0] is float:
            out.append((name, True))
    return out


def _section_models(method: str) -> dict[str, type[BaseModel]]:
    """The settings model of every section ``method`` reads (`ktl.methods.SECTIONS`)."""
    return {s: SECTIONS[s].model for s in METHODS[method].settings_model.sections()}


def _float_paths() -> list[tuple[str, str | None, str, bool]]:
    """(method, section or None, field, tuple?) for every float a federation spec of a served method
    can carry: the spec's own and every field of every section the method reads."""
    paths = []
    for method in SERVED:
        paths += [(method, None, name, tup) for name, tup in _float_fields(FederationSpec)]
        for section, model in _section_models(method).items():
            paths += [(method, section, name, tup) for name, tup in _float_fields(model)]
    return paths


def _body(method: str, section: str | None, name: str, value: str) -> str:
    body = {"method": method, "num_classes": 4}
    text = json.dumps(body)[:-1]
    inner = f'"{name}": {value}'
    return text + (f', "{section}": {{{inner}}}}}' if section else f", {inner}}}")


def test_every_float_of_every_spec_section_refuses_non_finite_values(http: TestClient) -> None:
    """Old code: tgp_margin_threshold 1e400 → 201, stored as null, and the listing answered 500."""
    paths = _float_paths()
    assert any(s == "baseline" and f == "tgp_margin_threshold" for _, s, f, _ in paths)
    assert any(s == "privacy" and f == "epsilon" for _, s, f, _ in paths)
    for method, section, name, tup in paths:
        for value in NOT_FINITE:
            r = http.post(
                "/v1/federations",
                content=_body(method, section, name, f"[{value}]" if tup else value),
                headers=JSON,
            )
            where = f"{method} {section}.{name}={value}"
            assert r.status_code == 422, (where, r.text)
            assert name in r.json()["error"]["message"], (where, r.json())
    for value in NOT_FINITE:  # a job's floats too
        for body in (f'{{"latents": [[{value}]]}}', f'{{"federation_id": "x", "spread": {value}}}'):
            r = http.post("/v1/jobs", content=body, headers=JSON)
            assert r.status_code == 422, (body, r.text)
    listed = http.get("/v1/federations", headers=auth(ADMIN))
    assert listed.status_code == 200 and listed.json() == []


def test_every_float_field_has_a_documented_finite_range() -> None:
    """No float of a spec is open-ended: each has a lower and an upper bound (or a validator holding one),
    and its model refuses inf/NaN."""
    models = {FederationSpec, JobSpec} | {m for method in SERVED for m in _section_models(method).values()}
    for model in models:
        assert model.model_config.get("allow_inf_nan") is False, model
        for name, tup in _float_fields(model):
            kinds = {type(m).__name__ for m in model.model_fields[name].metadata}
            if not tup:
                assert kinds & {"Ge", "Gt"} and kinds & {"Le", "Lt"}, (model.__name__, name, kinds)


@pytest.mark.parametrize(
    "privacy",
    [{"epsilon": 5e-324}, {"epsilon": 1e-300}, {"epsilon": 1.0, "delta": 1e-320}, {"epsilon": 1e400}],
)
def test_privacy_budgets_without_finite_noise_are_422_and_store_nothing(
    http: TestClient, privacy: dict[str, float]
) -> None:
    """Old code: ε = 5e-324 → 500 (division by zero) with the row left behind; δ = 1e-320 → noise_std null."""
    body = json.dumps({"method": "fedproto", "num_classes": 4, "privacy": {**privacy, "rounds": 3}})
    r = http.post("/v1/federations", content=body, headers=JSON)
    assert r.status_code == 422, r.text
    assert next(iter(privacy)) in r.json()["error"]["message"] or "delta" in r.json()["error"]["message"]
    listed = http.get("/v1/federations", headers=auth(ADMIN))
    assert listed.status_code == 200 and listed.json() == []


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/federations", '{"method": "fedproto", "num_classes": "4"}', "num_classes"),
        ("/v1/federations", '{"method": "fedproto", "num_classes": 4, "quorum": true}', "quorum"),
        ("/v1/federations", '{"method": "fedproto", "num_classes": 4, "baseline": {"lam": "0.5"}}', "lam"),
        ("/v1/federations", '{"method": "fedproto", "num_classes": 4, "num_classes": 5}', "num_classes"),
        (
            "/v1/federations",
            '{"method": "fedproto", "num_classes": 4, "privacy": {"rounds": 2, "rounds": 3}}',
            "rounds",
        ),
        ("/v1/jobs", '{"latents": [[0.5]], "per_class": "2"}', "per_class"),
        ("/v1/jobs", '{"latents": [[true]]}', "latents"),
    ],
)
def test_coerced_types_and_duplicate_keys_are_refused(
    http: TestClient, path: str, body: str, field: str
) -> None:
    """Old code: ``"4"`` and ``true`` were taken for numbers and the last of two equal keys won."""
    r = http.post(path, content=body, headers=JSON)
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"]
    assert http.get("/v1/federations", headers=auth(ADMIN)).json() == []


def test_integers_for_floats_and_arrays_for_tuples_still_pass(http: TestClient) -> None:
    body = {"method": "fedktl", "num_classes": 4, "quorum": 2, "round_deadline_s": 60,
            "aligner": {"lr": 1, "bandwidth_multipliers": [1, 2]}}  # fmt: skip
    r = http.post("/v1/federations", json=body, headers=auth(ADMIN))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["aligner"]["bandwidth_multipliers"] == [1.0, 2.0]


def _store_spec_as_an_old_server_did(data_dir: Path, fid: str) -> None:
    """What an older server stored for ``tgp_margin_threshold: 1e400``: the float written as null."""
    with sqlite3.connect(data_dir / "ktl.sqlite3") as db:
        (spec,) = db.execute("SELECT spec FROM federations WHERE id = ?", (fid,)).fetchone()
        spec = json.loads(spec)
        spec["baseline"]["tgp_margin_threshold"] = None
        db.execute("UPDATE federations SET spec = ? WHERE id = ?", (json.dumps(spec), fid))


def test_an_unreadable_stored_row_is_set_aside_not_fatal(tmp_path: Path) -> None:
    """Old code: such a row made GET/DELETE of it and the listing 500, and the server would not start,
    while ``ktl admin check`` said OK."""
    settings = make_settings(tmp_path / "data")
    with TestClient(create_app(settings)) as http:
        bad = http.post(
            "/v1/federations", json={"method": "fedtgp", "num_classes": 4}, headers=auth(ADMIN)
        ).json()["id"]
        good = http.post(
            "/v1/federations", json={"method": "fedproto", "num_classes": 4}, headers=auth(ADMIN)
        ).json()["id"]
    _store_spec_as_an_old_server_did(settings.data_dir, bad)

    report = check_data_dir(settings.data_dir)
    assert (
        not report.ok
        and f"federations/{bad}" in report.render()
        and "tgp_margin_threshold" in report.render()
    )

    with TestClient(create_app(settings)) as http:  # starts
        listed = http.get("/v1/federations", headers=auth(ADMIN))
        assert listed.status_code == 200 and [f["id"] for f in listed.json()] == [good]
        r = http.get(f"/v1/federations/{bad}", headers=auth(ADMIN))
        assert r.status_code == 409 and r.json()["error"]["reason"] == "unreadable_federation"
        assert "tgp_margin_threshold" in r.json()["error"]["message"]
        ready = http.get("/readyz").json()
        assert bad in ready["set_aside"] and "tgp_margin_threshold" in ready["set_aside"][bad]
        assert http.delete(f"/v1/federations/{bad}", headers=auth(ADMIN)).status_code in (200, 204)
        assert http.get(f"/v1/federations/{bad}", headers=auth(ADMIN)).status_code == 404
        assert http.get("/readyz").json()["set_aside"] == {}
    assert check_data_dir(settings.data_dir).ok


def _with_duplicate_header_key(data: bytes, key: str) -> bytes:
    """The safetensors file with ``key``'s header entry given twice (same entry: the parser keeps one)."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header)[:-1] + f', "{key}": ' + json.dumps(header[key]) + "}"
    text += " " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text.encode() + data[8 + size :]


def test_a_safetensors_header_naming_a_tensor_twice_is_refused() -> None:
    protos = Prototypes(torch.eye(3), torch.arange(3), torch.ones(3, dtype=torch.int64))
    data = _with_duplicate_header_key(st_save({"prototypes": protos.vectors, "class_ids": protos.class_ids,
                                               "counts": protos.counts}), "counts")  # fmt: skip
    with pytest.raises(PayloadError) as info:
        Prototypes.from_bytes(data)
    assert info.value.reason == "duplicate_tensor"
