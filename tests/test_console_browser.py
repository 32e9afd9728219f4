"""The operator's console in a real browser: Debian's Chromium driven by Playwright (no browser download).

A server runs on loopback (a thread of this process); the page signs in, creates a federation through its
form, registers clients, watches a round go from open to published while an SDK client uploads, shows the
pairs grid and the round's figures, runs a job to 100 % and downloads it — with hostile names shown as
text. Set ``KTL_CONSOLE_SCREENSHOTS=docs/images`` to (re)write the console's screenshots there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ktl.api import create_app
from ktl.api.process import ServerThread, free_port
from ktl.clients.sdk import KtlHttpClient
from tests.api.conftest import ADMIN, FAST_ALIGNER, make_settings, protos


def _chromium() -> str | None:
    for candidate in (
        os.environ.get("KTL_CHROMIUM"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary: install Debian's (`apt-get install chromium`; `make setup` does it as root) "
    "or set KTL_CHROMIUM",
)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
expect = sync_api.expect

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(1)>"
CLASS_NAMES = ["t-shirt", XSS_SCRIPT, XSS_IMG, "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
SCREENSHOTS = os.environ.get("KTL_CONSOLE_SCREENSHOTS")
TIMEOUT_MS = 60_000  # the longest any condition is waited for (an alignment on a busy CPU)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    data = tmp_path_factory.mktemp("console") / "data"
    thread = ServerThread(create_app(make_settings(data)), "127.0.0.1", free_port()).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--disable-gpu", "--no-sandbox"])
        yield b
        b.close()


class Watch:
    """What the page did that it must not: dialogs (an injected alert), CSP violations, tokens in URLs."""

    def __init__(self) -> None:
        self.dialogs: list[str] = []
        self.csp: list[str] = []
        self.urls: list[str] = []
        self.unauthenticated_api: list[str] = []


@pytest.fixture
def page(browser: Any, server: ServerThread) -> Iterator[tuple[Any, Watch]]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    watch = Watch()

    def on_dialog(dialog: Any) -> None:
        watch.dialogs.append(dialog.message)
        dialog.dismiss()

    def on_request(request: Any) -> None:
        watch.urls.append(request.url)
        if "/v1/" in request.url and "authorization" not in request.headers:
            watch.unauthenticated_api.append(request.url)

    pg.on("dialog", on_dialog)
    pg.on("request", on_request)
    pg.on(
        "console",
        lambda msg: watch.csp.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    yield pg, watch
    context.close()


def sign_in(pg: Any, server: ServerThread, token: str = ADMIN) -> None:
    pg.goto(server.url + "/")
    pg.get_by_test_id("token").fill(token)
    pg.get_by_role("button", name="Sign in").click()


def shoot(pg: Any, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(Path(SCREENSHOTS) / f"console-{name}.png"), full_page=True)


def test_sign_in_refuses_a_wrong_token_and_keeps_it_out_of_urls(
    page: tuple[Any, Watch], server: ServerThread
) -> None:
    pg, watch = page
    sign_in(pg, server, "not-the-token")
    expect(pg.get_by_test_id("signin-error")).to_contain_text("refused")
    expect(pg.get_by_test_id("signin-error")).to_contain_text("401")
    assert pg.evaluate("sessionStorage.getItem('ktl.console.token')") is None

    pg.get_by_test_id("token").fill(ADMIN)
    pg.get_by_role("button", name="Sign in").click()
    expect(pg.get_by_role("heading", name="Federations", exact=True)).to_be_visible()
    expect(pg.locator("#nav")).to_be_visible()
    assert pg.url.endswith("/console#/federations")
    assert pg.evaluate("sessionStorage.getItem('ktl.console.token')") == ADMIN
    assert pg.context.cookies() == []
    assert not any(ADMIN in url for url in watch.urls)
    assert watch.unauthenticated_api == []

    # Signing out forgets the token; the page asks for it again.
    pg.get_by_role("button", name="Sign out").click()
    expect(pg.get_by_test_id("token")).to_be_visible()
    assert pg.evaluate("sessionStorage.getItem('ktl.console.token')") is None
    assert watch.dialogs == [] and watch.csp == []


def test_a_federation_from_creation_to_a_downloaded_job(
    page: tuple[Any, Watch], server: ServerThread
) -> None:
    pg, watch = page
    sign_in(pg, server)
    form = pg.get_by_test_id("create-federation")
    form.get_by_test_id("spec-name").fill(f"fashion {XSS_IMG}")
    form.get_by_test_id("spec-num-classes").fill("10")
    form.get_by_test_id("spec-quorum").fill("2")
    form.get_by_test_id("spec-extra").fill(json.dumps({"aligner": FAST_ALIGNER, "etf_seed": 0}))
    # The API validates the spec: 9 names for 10 classes is refused, with its reason on the page.
    form.get_by_test_id("spec-class-names").fill("\n".join(CLASS_NAMES[:9]))
    form.get_by_role("button", name="Create federation").click()
    error = pg.get_by_test_id("create-error")
    expect(error).to_contain_text("422 validation")
    expect(error).to_contain_text("class_names has 9 names for 10 classes")

    form.get_by_test_id("spec-class-names").fill("\n".join(CLASS_NAMES))
    form.get_by_role("button", name="Create federation").click()
    expect(pg.get_by_test_id("federation-title")).to_have_text(f"fashion {XSS_IMG}")
    fid = pg.url.rsplit("/", 1)[1]
    assert fid.startswith("fed")  # the page went to the new federation's own page

    # The hostile class names are text: present literally, nothing injected, no dialog.
    names = pg.get_by_test_id("class-names").locator("li")
    expect(names).to_have_count(10)
    assert names.all_text_contents() == CLASS_NAMES
    assert pg.locator("main img").count() == 0 and pg.locator("main script").count() == 0

    # Clients registered through the page; each token is shown once.
    tokens = []
    for name in ("site-a", XSS_SCRIPT):
        pg.get_by_test_id("client-name-input").fill(name)
        pg.get_by_role("button", name="Register client").click()
        token_box = pg.get_by_test_id("client-token")
        expect(token_box).to_have_text(re.compile(r"^ktl_\S+$"))
        if tokens:
            expect(token_box).not_to_have_text(tokens[-1])  # a new token, not the last one still shown
        tokens.append(token_box.text_content())
    expect(pg.get_by_test_id("client-row")).to_have_count(2)
    expect(pg.get_by_test_id("client-name")).to_have_text(["site-a", XSS_SCRIPT])

    # Round 1 is open; uploads from the SDK show up live (no reload) until it is published.
    row = pg.locator("[data-testid=round-row][data-round='1']")
    expect(row).to_have_attribute("data-state", "open")
    expect(row.get_by_test_id("uploads")).to_have_text("0 / 2")
    pg.evaluate("window.__sameDocument = true")
    KtlHttpClient(server.url, tokens[0]).upload(fid, 1, protos([0, 1, 2, 3, 4], seed=1))
    expect(row.get_by_test_id("uploads")).to_have_text("1 / 2")
    shoot(pg, "federation")
    KtlHttpClient(server.url, tokens[1]).upload(fid, 1, protos([5, 6, 7, 8, 9, 1], seed=2))
    expect(row).to_have_attribute("data-state", "published")
    expect(pg.locator("[data-testid=round-row][data-round='2']")).to_have_attribute("data-state", "open")
    assert pg.evaluate("window.__sameDocument") is True

    # The round: its pairs grid (fetched with the bearer header, shown from a blob: URL) and its figures.
    row.get_by_role("link", name="Round 1").click()
    pairs = pg.get_by_test_id("pairs-image")
    expect(pairs).to_be_visible()
    pg.wait_for_function(
        "() => { const i = document.querySelector('[data-testid=pairs-image]');"
        " return i !== null && i.complete && i.naturalWidth > 0; }"
    )
    assert pairs.get_attribute("src").startswith("blob:")
    stats = pg.get_by_test_id("stats-table")
    expect(stats).to_contain_text("align loss (last step)")
    expect(stats).to_contain_text("MMD² (last step)")
    # The per-step curve from /align-history replaces the first/last summary: one point per aligner step.
    expect(pg.get_by_test_id("align-chart")).to_have_attribute("data-steps", str(FAST_ALIGNER["steps"]))
    expect(pg.get_by_test_id("round")).to_contain_text("2 / 2")
    round_json = KtlHttpClient(server.url, ADMIN).round(fid, 1)
    quality = round_json["quality"]  # the alignment quality report of a published fedktl round
    assert quality is not None
    expect(pg.get_by_test_id("quality-verdict")).to_have_attribute("data-verdict", quality["verdict"])
    expect(pg.get_by_test_id("quality-verdict")).to_have_text(quality["verdict_line"])
    assert float(pg.get_by_test_id("quality-mmd_ratio").text_content()) == pytest.approx(
        quality["mmd_ratio"], rel=1e-3, abs=1e-4
    )
    pg.wait_for_function(
        "() => { const i = document.querySelector('[data-testid=quality-image]');"
        " return i !== null && i.complete && i.naturalWidth > 0; }"
    )
    shoot(pg, "round")

    # A job from this round: its bar reaches 100 %, and its result downloads.
    pg.get_by_role("link", name="Generate images from this round…").click()
    expect(pg.get_by_test_id("job-federation")).to_have_value(fid)
    expect(pg.get_by_test_id("job-round")).to_have_value("1")
    pg.get_by_test_id("job-per-class").fill("3")
    pg.get_by_role("button", name="Submit job").click()
    job = pg.get_by_test_id("job")
    expect(job).to_have_attribute("data-state", "done")
    expect(job.get_by_test_id("job-progress")).to_have_attribute("value", "100")
    expect(job.get_by_test_id("job-progress-text")).to_contain_text("30 / 30 images · 100 %")
    shoot(pg, "job")
    with pg.expect_download() as info:
        job.get_by_test_id("job-download").click()
    data = Path(info.value.path()).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    assert header["images"]["shape"][0] == 30  # a safetensors file with the 30 images

    # The hostile names never ran: no dialog, no CSP violation, every API call authenticated.
    assert watch.dialogs == []
    assert watch.csp == []
    assert watch.unauthenticated_api == []
    assert not any(ADMIN in url for url in watch.urls)


def test_quality_report_shown_when_the_server_has_one(page: tuple[Any, Watch], server: ServerThread) -> None:
    admin = KtlHttpClient(server.url, ADMIN)
    fed = admin.create_federation({"num_classes": 10, "quorum": 1, "aligner": FAST_ALIGNER, "etf_seed": 0})
    token = admin.register_client(fed["id"], "q")["token"]
    KtlHttpClient(server.url, token).upload(fed["id"], 1, protos(list(range(10))))
    state = admin.wait_for_round(fed["id"], 1, timeout=120)
    if state.get("quality") is None:
        pytest.skip("this server's round JSON has no `quality` report (the alignment quality report)")
    quality = state["quality"]
    pg, watch = page
    sign_in(pg, server)
    pg.goto(f"{server.url}/console#/federations/{fed['id']}/rounds/1")
    expect(pg.get_by_test_id("quality-verdict")).to_have_attribute("data-verdict", quality["verdict"])
    expect(pg.get_by_test_id("quality-verdict")).to_have_text(quality["verdict_line"])
    for key in ("mmd_to_prior", "mmd_ratio", "centroid_min_distance", "kid"):
        shown = float(pg.get_by_test_id(f"quality-{key}").text_content())
        assert shown == pytest.approx(quality[key], rel=1e-3, abs=1e-4), key
    expect(pg.get_by_test_id("quality-table")).to_contain_text("MMD ratio")
    expect(pg.get_by_test_id("quality-spread").locator("tbody tr")).to_have_count(
        len(quality["class_spread"])
    )
    # per class: its centroid norm, whether it lies in the prior's norm band, its rows and holders
    for c, facts in quality["classes"].items():
        row = pg.get_by_test_id(f"quality-class-{c}")
        expect(row).to_have_attribute("data-inside", "true" if facts["inside"] else "false")
        assert float(row.locator("td").nth(2).text_content()) == pytest.approx(facts["norm"], rel=1e-3)
        expect(row.locator("td").nth(5)).to_have_text(str(facts["holders"]))
    expect(pg.get_by_test_id("quality-band")).to_contain_text("99 % norm band")
    pg.wait_for_function(
        "() => { const i = document.querySelector('[data-testid=quality-image]');"
        " return i !== null && i.complete && i.naturalWidth > 0; }"
    )
    assert watch.dialogs == [] and watch.csp == []


def test_health_page_reads_readyz_and_metrics(page: tuple[Any, Watch], server: ServerThread) -> None:
    pg, watch = page
    sign_in(pg, server)
    pg.get_by_role("link", name="Health").click()
    expect(pg.get_by_test_id("ready-status")).to_contain_text("ready (200)")
    expect(pg.get_by_test_id("device")).to_have_text("cpu")
    expect(pg.get_by_test_id("disk-free")).to_contain_text("B")
    uploads = pg.locator("[data-testid=counter][data-metric=ktl_uploads_total] [data-testid=counter-value]")
    expect(uploads).to_have_text(str(int(metric_value(server, "ktl_uploads_total"))))
    assert watch.dialogs == [] and watch.csp == []


def metric_value(server: ServerThread, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_the_federation_page_draws_accuracy_per_round_and_its_buttons_follow_its_state(
    page: tuple[Any, Watch], server: ServerThread
) -> None:
    """Clients send their evaluation with each upload; the federation's page draws the sample-weighted
    mean per round with the clients' spread, and offers only the buttons its state allows."""
    admin = KtlHttpClient(server.url, ADMIN)
    fed = admin.create_federation({"name": "curve", "method": "fedproto", "num_classes": 10, "quorum": 2})
    fid = fed["id"]
    sites = [KtlHttpClient(server.url, admin.register_client(fid, f"site-{i}")["token"]) for i in range(2)]
    reports = {  # round → [(n_samples, accuracy)] of the two sites: a federation that learns
        1: [(100, 0.31), (300, 0.42)],
        2: [(100, 0.48), (300, 0.61)],
        3: [(100, 0.66), (300, 0.70)],
        4: [(100, 0.71), (300, 0.83)],
    }
    for r, pairs in reports.items():
        for i, (sdk, (n, acc)) in enumerate(zip(sites, pairs, strict=True)):
            sdk.upload(fid, r, protos([i, i + 2, i + 4], seed=r), metrics={"n_samples": n, "accuracy": acc})
        assert admin.wait_for_round(fid, r, timeout=60)["state"] == "published"
    means = {r: sum(n * a for n, a in pairs) / sum(n for n, _ in pairs) for r, pairs in reports.items()}

    pg, watch = page
    sign_in(pg, server)
    pg.goto(f"{server.url}/console#/federations/{fid}")
    chart = pg.get_by_test_id("accuracy-chart")
    expect(chart).to_have_attribute("data-rounds", "4")
    expect(chart).to_have_attribute("data-metric", "accuracy")
    assert float(chart.get_attribute("data-last")) == pytest.approx(means[4], abs=1e-9)
    dots = chart.locator("circle.dot")
    expect(dots).to_have_count(4)
    drawn = [float(d.get_attribute("data-mean")) for d in dots.all()]
    assert drawn == pytest.approx([means[r] for r in (1, 2, 3, 4)], abs=1e-9)
    # Higher accuracy is drawn higher (SVG y grows downwards), and the spread band is there.
    heights = [float(d.get_attribute("cy")) for d in dots.all()]
    assert heights == sorted(heights, reverse=True)
    expect(chart.get_by_test_id("spread-band")).to_have_count(1)
    expect(pg.get_by_test_id("curve-row").first.get_by_test_id("curve-mean")).to_have_text(f"{means[4]:.4f}")

    # The buttons follow the state: Pause while active; once paused, Resume (and uploads are refused).
    actions = pg.get_by_test_id("federation-actions")
    expect(actions.get_by_test_id("federation-pause")).to_be_visible()
    expect(actions.get_by_test_id("federation-resume")).to_have_count(0)
    shoot(pg, "accuracy")
    actions.get_by_test_id("federation-pause").click()
    expect(actions.get_by_test_id("federation-resume")).to_be_visible()
    expect(actions.get_by_test_id("federation-pause")).to_have_count(0)
    assert admin.federation(fid)["state"] == "paused"
    actions.get_by_test_id("federation-resume").click()
    expect(actions.get_by_test_id("federation-pause")).to_be_visible()
    expect(actions.get_by_test_id("federation-delete")).to_be_enabled()
    assert admin.federation(fid)["state"] == "active"

    # The list of federations shows the state and the same buttons.
    admin.pause_federation(fid)
    pg.goto(f"{server.url}/console#/federations")
    row = pg.locator(f"[data-testid=federation-row][data-fid='{fid}']")
    expect(row).to_have_attribute("data-state", "paused")
    expect(row.get_by_test_id("federation-resume")).to_be_visible()
    expect(row.get_by_test_id("federation-pause")).to_have_count(0)
    row.get_by_test_id("federation-resume").click()
    expect(row.get_by_test_id("federation-pause")).to_be_visible()
    assert watch.dialogs == [] and watch.csp == []


def test_the_jobs_page_lists_every_job_from_the_server(page: tuple[Any, Watch], server: ServerThread) -> None:
    admin = KtlHttpClient(server.url, ADMIN)
    ids = [admin.submit_job({"latents": [[0.0] * 256], "per_class": 1, "seed": s})["id"] for s in (1, 2)]
    for job_id in ids:
        admin.wait_for_job(job_id, timeout=60, poll=0.05)
    pg, watch = page
    sign_in(pg, server)  # a fresh tab: the jobs come from GET /v1/jobs, not from what this tab submitted
    pg.get_by_role("link", name="Jobs").click()
    for job_id in ids:
        expect(pg.locator(f"[data-testid=job][data-job='{job_id}']")).to_have_attribute("data-state", "done")
    shown = [j.get_attribute("data-job") for j in pg.get_by_test_id("job").all()]
    assert shown.index(ids[1]) < shown.index(ids[0])  # newest first
    assert watch.dialogs == [] and watch.csp == []
