"""The console's HTTP side (no browser): static files, security headers, and data kept behind the API."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ktl.api import create_app
from ktl.api.console.router import CONTENT_SECURITY_POLICY, STATIC_FILES
from tests.api.conftest import ADMIN, FAST_ALIGNER, auth, make_settings

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
STATIC = resources.files("ktl.api.console").joinpath("static")
HOSTILE = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "a&b", '"quoted"']


@pytest.fixture
def http(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(tmp_path / "data"))) as client:
        yield client


def csp_directives(header: str) -> dict[str, list[str]]:
    out = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            out[words[0]] = words[1:]
    return out


def test_root_redirects_to_the_console(http: TestClient) -> None:
    response = http.get("/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/console"
    page = http.get("/")
    assert page.status_code == 200 and page.url.path == "/console"
    assert "<title>ktl console</title>" in page.text


@pytest.mark.parametrize("path", ["/console", "/console/", *(f"/console/{name}" for name in STATIC_FILES)])
def test_console_files_are_public_with_strict_headers(http: TestClient, path: str) -> None:
    response = http.get(path)  # no token: the page itself is public
    assert response.status_code == 200
    name = path.removeprefix("/console").strip("/") or "index.html"
    assert response.headers["content-type"] == STATIC_FILES[name]
    assert response.content == STATIC.joinpath(name).read_bytes()
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    csp = csp_directives(response.headers["content-security-policy"])
    assert csp["default-src"] == ["'self'"]
    assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["img-src"] == ["'self'", "blob:"]
    assert csp["object-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"]
    assert "unsafe-inline" not in response.headers["content-security-policy"]
    assert "unsafe-eval" not in response.headers["content-security-policy"]


@pytest.mark.parametrize(
    "path", ["/console/nope.js", "/console/router.py", "/console/..%2Frouter.py", "/console/static"]
)
def test_only_the_listed_files_are_served(http: TestClient, path: str) -> None:
    response = http.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["reason"] == "not_found"


def test_every_shipped_file_is_listed_and_declared_as_package_data() -> None:
    on_disk = {p.name for p in STATIC.iterdir() if p.is_file()}
    assert on_disk == set(STATIC_FILES)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert setuptools["package-dir"]["ktl.api.console"] == "api/console"
    assert "ktl.api.console" in setuptools["packages"]
    patterns = setuptools["package-data"]["ktl.api.console"]
    for name in on_disk:
        assert any(Path("static", name).match(p) for p in patterns), name
    assert any(dep.startswith("playwright") for dep in pyproject["project"]["optional-dependencies"]["dev"])


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text += data


def test_the_page_has_no_inline_script_style_or_handler() -> None:
    parser = _Tags()
    parser.feed(STATIC.joinpath("index.html").read_text())
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert scripts and all(
        a.get("src", "").startswith("/console/") and a.get("type") == "module" for a in scripts
    )
    assert parser.script_text.strip() == ""
    assert not [tag for tag, _ in parser.tags if tag == "style"]
    for tag, attrs in parser.tags:
        assert not [k for k in attrs if k.startswith("on") or k == "style"], (tag, attrs)


@pytest.mark.parametrize("name", [n for n in STATIC_FILES if n.endswith(".js")])
def test_scripts_never_turn_data_into_html(name: str) -> None:
    source = STATIC.joinpath(name).read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in source, f"{name} uses {sink}"
    assert not re.search(r"setAttribute\(\s*['\"]on", source)
    # The token is only ever a header: never put in a URL, a cookie or a log.
    assert "document.cookie" not in source and "console.log" not in source
    assert not re.search(r"[?&]token=", source)


def test_data_stays_behind_the_api_and_hostile_names_come_back_as_json_text(http: TestClient) -> None:
    assert http.get("/v1/federations").status_code == 401
    assert http.get("/v1/federations", headers=auth("wrong")).json()["error"]["reason"] == "bad_token"
    page_before = http.get("/console").content
    spec = {
        "num_classes": 4,
        "quorum": 1,
        "name": HOSTILE[0],
        "class_names": HOSTILE,
        "aligner": FAST_ALIGNER,
    }
    created = http.post("/v1/federations", json=spec, headers=auth(ADMIN))
    assert created.status_code == 201
    fid = created.json()["id"]
    http.post(f"/v1/federations/{fid}/clients", json={"name": HOSTILE[1]}, headers=auth(ADMIN))
    fed = http.get(f"/v1/federations/{fid}", headers=auth(ADMIN))
    assert fed.headers["content-type"] == "application/json"
    assert fed.json()["spec"]["class_names"] == HOSTILE and fed.json()["spec"]["name"] == HOSTILE[0]
    clients = http.get(f"/v1/federations/{fid}/clients", headers=auth(ADMIN)).json()
    assert [c["name"] for c in clients] == [HOSTILE[1]]
    # The page is the same static file whatever the data: nothing is rendered into it on the server.
    after = http.get("/console")
    assert after.content == page_before
    assert b"alert(1)" not in after.content


def test_the_console_is_not_in_the_openapi_schema(http: TestClient) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/console")]
