"""Fixtures for API tests: an app on a temporary data folder, a TestClient, SDK handles."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fastapi import FastAPI
from fastapi.testclient import TestClient

from ktl.api import ServerSettings, create_app
from ktl.api.service import KtlService
from ktl.clients import simplex_etf
from ktl.clients.sdk import KtlHttpClient
from ktl.records import Prototypes

ADMIN = "admin-secret-for-tests"
FAST_ALIGNER = {"steps": 15, "prior_samples": 64, "bandwidth_samples": 256}


def make_settings(data_dir: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = dict(
        data_dir=data_dir,
        admin_token=ADMIN,
        device="cpu",
        scheduler_interval_s=0.05,
        rate_limit_per_minute=60000,
        rate_limit_burst=10000,
    )
    values.update(overrides)
    return ServerSettings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> ServerSettings:
    return make_settings(tmp_path / "data")


@pytest.fixture
def app(settings: ServerSettings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def http(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


@pytest.fixture
def service(app: FastAPI, http: TestClient) -> KtlService:
    svc: KtlService = app.state.service
    return svc


@pytest.fixture
def admin(http: TestClient) -> KtlHttpClient:
    return KtlHttpClient("", ADMIN, http=http, retries=0)


def federation(admin: KtlHttpClient, **spec: Any) -> dict[str, Any]:
    body = {"num_classes": 10, "quorum": 3, "aligner": FAST_ALIGNER, "etf_seed": 0, **spec}
    return admin.create_federation(body)


def register(admin: KtlHttpClient, http: TestClient, fid: str, n: int) -> list[KtlHttpClient]:
    return [
        KtlHttpClient("", admin.register_client(fid, f"c{i}")["token"], http=http, retries=0)
        for i in range(n)
    ]


def protos(classes: list[int], seed: int = 0, k: int = 10) -> Prototypes:
    g = torch.Generator().manual_seed(seed)
    base = simplex_etf(10, k, seed=0).T[torch.tensor(classes) % 10]
    vectors = F.normalize(base + 0.1 * torch.randn(len(classes), k, generator=g), dim=1)
    return Prototypes(vectors, torch.tensor(classes), torch.randint(1, 50, (len(classes),), generator=g))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def octet(token: str) -> dict[str, str]:
    return {**auth(token), "Content-Type": "application/octet-stream"}


def wait_for(
    client: KtlHttpClient, fid: str, r: int, states: tuple[str, ...], timeout: float = 60
) -> dict[str, Any]:
    """Poll round ``r`` until its state is one of ``states`` (a failed assertion after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while (state := client.round(fid, r))["state"] not in states:
        assert time.monotonic() < deadline, state
        time.sleep(0.02)
    return state
