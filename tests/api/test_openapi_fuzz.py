"""Property-based requests generated from the OpenAPI schema (schemathesis), sent over HTTP to the app
served by uvicorn on loopback: whatever the request, the server never answers 5xx."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from ktl.api import create_app
from ktl.api.process import ServerThread, free_port
from tests.api.conftest import ADMIN, make_settings

# max_job_images small: a generated job that happens to be valid must not keep the device busy.
_APP = create_app(
    make_settings(Path(tempfile.mkdtemp(prefix="ktl-fuzz-")), max_job_images=64, max_upload_bytes=65536)
)
_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
schema = schemathesis.openapi.from_dict(_APP.openapi())


@pytest.fixture(scope="module")
def base_url():  # type: ignore[no-untyped-def]
    server = ServerThread(_APP, "127.0.0.1", free_port()).start()
    fed = httpx.post(f"{server.url}/v1/federations", json={"num_classes": 4, "quorum": 2, "aligner": {"steps": 5}},
                     headers=_ADMIN).json()  # fmt: skip
    httpx.post(f"{server.url}/v1/federations/{fed['id']}/clients", json={"name": "fuzz"}, headers=_ADMIN)
    yield server.url
    server.stop()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_as_admin(case, base_url) -> None:  # type: ignore[no-untyped-def]
    case.call_and_validate(base_url=base_url, headers=_ADMIN, checks=[not_a_server_error])


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_without_credentials(case, base_url) -> None:  # type: ignore[no-untyped-def]
    case.call_and_validate(base_url=base_url, checks=[not_a_server_error])
