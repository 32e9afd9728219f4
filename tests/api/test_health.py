from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ktl.api import create_app, load_settings
from ktl.cli import main
from ktl.errors import ConfigError
from tests.api.conftest import ADMIN, make_settings


def test_health_ready_metrics_docs(http: TestClient) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["generators"] == ["default"]
    text = http.get("/metrics").text
    for name in (
        "ktl_uploads_total",
        "ktl_round_duration_seconds",
        "ktl_job_duration_seconds",
        "ktl_bytes_received_total",
        "ktl_bytes_sent_total",
        "ktl_gpu_memory_allocated_bytes",
    ):
        assert name in text
    assert http.get("/docs").status_code == 404  # Swagger UI would load from a CDN: off
    assert http.get("/redoc").status_code == 404
    paths = http.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/federations",
        "/v1/federations/{fid}/rounds/{r}/prototypes",
        "/v1/federations/{fid}/rounds/{r}/pairs",
        "/v1/federations/{fid}/rounds/{r}/pairs.png",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/result",
    ):
        assert path in paths


def test_not_ready_before_start(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "d"))
    client = TestClient(app)  # no context manager: the lifespan has not run
    assert client.get("/readyz").status_code == 503


def test_unknown_route_has_the_error_shape(http: TestClient) -> None:
    response = http.get("/v2/nothing")
    assert response.status_code == 404 and response.json()["error"]["reason"] == "not_found"


def test_server_refuses_to_start_without_an_admin_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.delenv("KTL_ADMIN_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="KTL_ADMIN_TOKEN"):
        create_app(load_settings(data_dir=tmp_path / "d"))
    assert main(["serve", "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ktl: error: no admin token") and "KTL_ADMIN_TOKEN" in err


def test_settings_precedence_flags_env_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "ktl.toml"
    toml.write_text(
        'port = 9001\nhost = "0.0.0.0"\nadmin_token = "from-file"\nmax_upload_bytes = 2048\n'
        "[generators.default]\nbatch_size = 8\n"
    )
    s = load_settings(toml)
    assert (s.port, s.host, s.admin_token.get_secret_value(), s.generators["default"].batch_size) == (
        9001,
        "0.0.0.0",
        "from-file",
        8,
    )
    monkeypatch.setenv("KTL_ADMIN_TOKEN", "from-env")
    monkeypatch.setenv("KTL_PORT", "9002")
    s = load_settings(toml)
    assert s.port == 9002 and s.admin_token.get_secret_value() == "from-env" and s.max_upload_bytes == 2048
    s = load_settings(toml, port=9003, data_dir=tmp_path / "x")
    assert s.port == 9003 and s.data_dir == tmp_path / "x"


def test_bad_settings_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KTL_PORT", "not-a-port")
    with pytest.raises(ConfigError, match="port"):
        load_settings()
    monkeypatch.delenv("KTL_PORT")
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [")
    with pytest.raises(ConfigError):
        load_settings(bad)
    with pytest.raises(ConfigError, match="unknown setting|extra"):
        load_settings(admin_token=ADMIN, colour="blue")


def test_generators_are_loaded_once_at_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ktl.api.service as service_module

    calls = []
    real = service_module.load_generator

    def counting(spec, device):  # type: ignore[no-untyped-def]
        calls.append(spec)
        return real(spec, device)

    monkeypatch.setattr(service_module, "load_generator", counting)
    app = create_app(make_settings(tmp_path / "d"))
    assert calls == []
    with TestClient(app) as client:
        for _ in range(3):
            client.get("/readyz")
    assert len(calls) == 1
