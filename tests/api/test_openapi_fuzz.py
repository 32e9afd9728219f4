"""Property-based requests generated from /openapi.json (schemathesis) against the app served by uvicorn
on loopback: whatever the request, the server never answers 5xx."""

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

_PORT = free_port()
# max_job_images small: a generated job that happens to be valid must not keep the device busy.
_SERVER = ServerThread(
    create_app(
        make_settings(Path(tempfile.mkdtemp(prefix="ktl-fuzz-")), max_job_images=64, max_upload_bytes=65536)
    ),
    "127.0.0.1",
    _PORT,
).start()
_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
_fed = httpx.post(
    f"{_SERVER.url}/v1/federations",
    json={"num_classes": 4, "quorum": 2, "aligner": {"steps": 5}},
    headers=_ADMIN,
).json()
httpx.post(f"{_SERVER.url}/v1/federations/{_fed['id']}/clients", json={"name": "fuzz"}, headers=_ADMIN)
schema = schemathesis.openapi.from_url(f"{_SERVER.url}/openapi.json")


@pytest.fixture(scope="module", autouse=True)
def _stop_server():  # type: ignore[no-untyped-def]
    yield
    _SERVER.stop()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_as_admin(case) -> None:  # type: ignore[no-untyped-def]
    case.call_and_validate(headers=_ADMIN, checks=[not_a_server_error])


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_without_credentials(case) -> None:  # type: ignore[no-untyped-def]
    case.call_and_validate(checks=[not_a_server_error])
