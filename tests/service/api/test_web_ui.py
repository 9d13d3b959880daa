"""The web UI and the API docs in headless Chromium with the network off (only loopback is reachable):
pick a task, upload a query image, see results with "why similar" bars (full task names, the queried
task marked, negative similarities drawn with their sign), a failed search clears the old results, an
upload is shown on the gallery's last page and the pager stops there; /docs and /redoc render from the
package's own assets. Driven through chromedriver's W3C WebDriver HTTP API with httpx (no extra
dependency). The screenshot is saved as test-artifacts/web-ui.png. The browser tests skip, saying what to
install, without Chromium or its driver; CI installs both (.ci/run)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.api.routes.docs import ASSETS_URL
from tests.factories import face
from tests.service.api.server import Server, free_socket, running_server, settings_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element key
# Debian's packages: `chromium` is the browser, `chromium-driver` puts chromedriver on PATH.
MISSING = [pkg for pkg, found in (("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER)) if not found]
needs_browser = pytest.mark.skipif(
    bool(MISSING),
    reason=f"{' and '.join(MISSING)} not installed: apt-get install -y {' '.join(MISSING)}",
)
# The network off: no host name resolves, and anything not on loopback goes to a dead proxy.
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9"]


class Browser:
    """The few WebDriver commands the test needs."""

    def __init__(self, driver_url: str, session: str) -> None:
        self.http = httpx.Client(base_url=f"{driver_url}/session/{session}", timeout=60)

    def call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        response = self.http.request(method, path, json=payload)
        body = response.json()
        if response.status_code != 200:
            raise AssertionError(f"webdriver {path}: {body}")
        return body["value"]

    def open(self, url: str) -> None:
        self.call("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        found = self.call("POST", "/element", {"using": "css selector", "value": css})
        return str(found[ELEMENT])

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self.call("POST", "/elements", {"using": "css selector", "value": css})]

    def type_into(self, element: str, text: str, clear: bool = True) -> None:
        if clear:
            self.call("POST", f"/element/{element}/clear", {})
        self.call("POST", f"/element/{element}/value", {"text": text})

    def click(self, element: str) -> None:
        self.call("POST", f"/element/{element}/click", {})

    def text(self, element: str) -> str:
        return str(self.call("GET", f"/element/{element}/text"))

    def script(self, source: str) -> Any:
        return self.call("POST", "/execute/sync", {"script": source, "args": []})

    def script_async(self, source: str) -> Any:
        """``source`` runs with its callback as ``arguments[0]``; returns what it is called with."""
        return self.call("POST", "/execute/async", {"script": source, "args": []})

    def foreign_resources(self, origin: str) -> list[str]:
        """Everything the page loaded from anywhere but ``origin``."""
        names = self.script("return performance.getEntriesByType('resource').map(e => e.name)")
        return [name for name in names if not name.startswith(origin + "/")]

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("GET", "/screenshot")))

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.1)
        status = self.text(self.find("#status"))
        raise AssertionError(f"timed out waiting for {what}; page status: {status!r}")


@pytest.fixture
def browser() -> Iterator[Browser]:
    assert CHROMEDRIVER is not None and CHROMIUM is not None
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    driver = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    profile = tempfile.mkdtemp(prefix="modret-chromium-")
    driver_url = f"http://127.0.0.1:{port}"
    session = None
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{driver_url}/status", timeout=2).json()["value"]["ready"]:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.skip("chromedriver did not start")
            time.sleep(0.1)
        args = [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-quic", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            "--window-size=1280,1000", *OFFLINE,
        ]  # fmt: skip
        capabilities = {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}
        created = httpx.post(
            f"{driver_url}/session", json={"capabilities": {"alwaysMatch": capabilities}}, timeout=60
        ).json()
        if "sessionId" not in created.get("value", {}):
            pytest.skip(f"chromium could not start: {created.get('value')}")
        session = created["value"]["sessionId"]
        yield Browser(driver_url, session)
    finally:
        if session is not None:
            httpx.delete(f"{driver_url}/session/{session}", timeout=30)
        driver.terminate()
        driver.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def ui_server(run_dir: Path, index_dir: Path) -> Iterator[Server]:
    with running_server(settings_for(run_dir, index_dir)) as server:
        yield server


def page_text(browser: Browser) -> str:
    return browser.text(browser.find("#page")).strip()


def disabled(browser: Browser, css: str) -> bool:
    return bool(browser.script(f"return document.querySelector({css!r}).disabled"))


@needs_browser
def test_the_browser_is_offline(browser: Browser, ui_server: Server) -> None:
    """The control for every "offline" claim below: only loopback answers this browser."""
    browser.open(ui_server.url + "/")
    outcome = browser.script_async(
        "const done = arguments[0];"
        "fetch('https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css', {mode: 'no-cors'})"
        ".then(() => done('reached'), (e) => done('failed: ' + e))"
    )
    assert outcome.startswith("failed"), outcome


@needs_browser
def test_search_from_the_web_ui(browser: Browser, ui_server: Server, tmp_path: Path) -> None:
    query = tmp_path / "query.png"
    query.write_bytes(face(300)[0])
    browser.open(ui_server.url + "/")
    browser.wait_for(lambda: browser.text(browser.find("#status")) == "ready", "tasks and gallery to load")
    assert len(browser.find_all("#gallery .thumb img")) == 24
    header = browser.text(browser.find("header"))
    assert "face" not in header.lower() and "gallery images" in header  # no gallery is assumed faces

    weights = {
        w: browser.call("GET", f"/element/{w}/attribute/data-task") for w in browser.find_all(".task-weight")
    }
    by_task = {task: element for element, task in weights.items()}
    browser.type_into(by_task["Smiling"], "0")
    browser.type_into(by_task["Eyeglasses"], "1")
    browser.type_into(browser.find("#file"), str(query), clear=False)
    browser.click(browser.find("#search"))
    browser.wait_for(lambda: len(browser.find_all("#results .result")) > 0, "search results")

    cards = browser.find_all("#results .result")
    assert len(cards) == 12
    assert "Eyeglasses" in browser.text(browser.find("#status"))
    bars = browser.script(
        "return [...document.querySelectorAll('#results .result .bar')].map(b => {"
        "  const name = b.querySelector('.name'), fill = b.querySelector('.fill');"
        "  return {task: b.dataset.task, name: name.textContent,"
        "          value: b.querySelector('.value').textContent,"
        "          clipped: name.scrollWidth > name.clientWidth, queried: b.classList.contains('queried'),"
        "          negative: b.classList.contains('negative'), width: fill.getBoundingClientRect().width,"
        "          track: b.querySelector('.track').getBoundingClientRect().width}; })"
    )
    assert len(bars) == 12 * 4  # why-similar bars, every task
    chips = browser.script(
        "return [...document.querySelectorAll('#results .result')].map(c =>"
        "  [...c.querySelectorAll('.labels .label')]"
        "    .map(l => [l.textContent, l.classList.contains('queried')]))"
    )
    for card in chips:  # each result's labels by name, the queried task's first and marked
        assert card[0] in (["Eyeglasses: 0", True], ["Eyeglasses: 1", True]), card
        for text, queried in card:
            assert re.fullmatch(r"\w+: [01]", text) and queried == text.startswith("Eyeglasses"), card
    for bar in bars:
        assert bar["name"] == bar["task"].replace("_", " ") and not bar["clipped"], bar  # full names
        assert bar["queried"] == (bar["task"] == "Eyeglasses"), bar
        assert re.fullmatch(r"[+-]\d\.\d\d|0\.00", bar["value"]), bar  # signed
        value = float(bar["value"])
        assert bar["negative"] == (value < 0), bar
        assert bar["width"] == pytest.approx(abs(value) / 2 * bar["track"], abs=1.5), bar
    browser.wait_for(
        lambda: bool(
            browser.script(
                "return [...document.querySelectorAll('#results img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
        ),
        "result images to load",
    )
    browser.screenshot(ARTIFACTS / "web-ui.png")
    assert (ARTIFACTS / "web-ui.png").stat().st_size > 10_000

    # A search that fails does not leave the previous query's results under its error.
    browser.type_into(browser.find("#k"), "5000")
    browser.click(browser.find("#search"))
    browser.wait_for(
        lambda: bool(browser.find_all("#status.error")) and not browser.find_all("#results .result"),
        "the error to replace the results",
    )
    assert "k" in browser.text(browser.find("#status"))
    assert browser.foreign_resources(ui_server.url) == []


@needs_browser
def test_negative_similarity_bars_show_their_sign(browser: Browser, ui_server: Server) -> None:
    """A constructed case: a trained model rarely gives a hit a negative similarity on cue."""
    browser.open(ui_server.url + "/")
    rows = browser.script(
        "const box = bars({Mouth_Slightly_Open: -0.4, Smiling: 0.3}, ['Smiling']);"
        "document.getElementById('results').append(box);"
        "return [...box.querySelectorAll('.bar')].map(b => {"
        "  const fill = b.querySelector('.fill').getBoundingClientRect();"
        "  const track = b.querySelector('.track').getBoundingClientRect();"
        "  return [b.querySelector('.name').textContent, b.querySelector('.value').textContent,"
        "          b.className, (fill.left - track.left) / track.width, fill.width / track.width]; })"
    )
    (name, value, classes, left, width), smiling = rows
    assert (name, value) == ("Mouth Slightly Open", "-0.40") and "negative" in classes
    assert "queried" not in classes and "queried" in smiling[2] and smiling[1] == "+0.30"
    assert left == pytest.approx(0.3, abs=0.01) and width == pytest.approx(0.2, abs=0.01)  # left of 0
    assert smiling[3] == pytest.approx(0.5, abs=0.01) and smiling[4] == pytest.approx(0.15, abs=0.01)


@needs_browser
def test_an_upload_is_shown_and_the_pager_stops_at_the_last_page(
    browser: Browser, ui_server: Server, tmp_path: Path
) -> None:
    browser.open(ui_server.url + "/")
    browser.wait_for(lambda: browser.text(browser.find("#status")) == "ready", "tasks and gallery to load")
    assert (
        page_text(browser) == "1 / 1 (24 images)"
        and disabled(browser, "#next")
        and disabled(browser, "#prev")
    )

    new_image = tmp_path / "new.png"
    new_image.write_bytes(face(301)[0])
    browser.type_into(browser.find("#upload"), str(new_image), clear=False)
    browser.wait_for(lambda: "added 1 image" in browser.text(browser.find("#status")), "the upload")
    with ui_server.client() as client:
        page = client.get("/images", params={"limit": 100}).json()
    assert page["total"] == 25
    new_id = max(item["id"] for item in page["items"])
    # The upload is on the last page, where the UI now is, and marked.
    assert page_text(browser) == "2 / 2 (25 images)"
    fresh = browser.script(
        "return [...document.querySelectorAll('#gallery .thumb.fresh')].map(t => t.dataset.id)"
    )
    assert fresh == [str(new_id)]

    # Driven to its last page, the pager stays there.
    browser.click(browser.find("#prev"))
    browser.wait_for(lambda: page_text(browser).startswith("1 / 2"), "the first page")
    assert len(browser.find_all("#gallery .thumb")) == 24 and disabled(browser, "#prev")
    for _ in range(3):
        browser.click(browser.find("#next"))
        time.sleep(0.2)
    browser.wait_for(lambda: page_text(browser).startswith("2 / 2"), "the last page")
    assert len(browser.find_all("#gallery .thumb")) == 1 and disabled(browser, "#next")
    browser.script(
        "document.getElementById('next').disabled = false; document.getElementById('next').click()"
    )
    time.sleep(0.5)  # the handler's own guard: an enabled ▶ on the last page does nothing
    assert page_text(browser).startswith("2 / 2") and len(browser.find_all("#gallery .thumb")) == 1


@needs_browser
def test_the_api_docs_render_offline(browser: Browser, ui_server: Server) -> None:
    browser.open(ui_server.url + "/docs")
    browser.wait_for(
        lambda: len(browser.find_all(".swagger-ui .opblock")) >= 5, "Swagger UI to render the operations"
    )
    assert "modret" in browser.text(browser.find(".swagger-ui .info .title"))
    assert "/search" in browser.text(browser.find(".swagger-ui"))
    assert browser.foreign_resources(ui_server.url) == []

    browser.open(ui_server.url + "/redoc")
    browser.wait_for(lambda: bool(browser.find_all(".redoc-wrap .api-content")), "ReDoc to render")
    assert "/search" in browser.text(browser.find(".redoc-wrap"))
    # The one thing ReDoc reaches for elsewhere is its sidebar's "powered by" logo: the page's CSP blocks
    # it (online too), ReDoc drops the image when it fails, and nothing else comes from anywhere but us.
    assert set(browser.foreign_resources(ui_server.url)) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}
    assert not browser.find_all(".redoc-wrap img[src^='https:']")


ASSET = re.compile(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""")


@pytest.mark.parametrize("keyed", [False, True])
def test_docs_pages_reference_only_local_assets(run_dir: Path, index_dir: Path, keyed: bool) -> None:
    """No browser needed: every URL the docs pages load is one of ours, and is served (without the key:
    the assets are public, like the web UI's files)."""
    settings = settings_for(run_dir, index_dir, **({"api_key": "reader-secret"} if keyed else {}))
    key = {"X-API-Key": "reader-secret"} if keyed else {}
    with running_server(settings) as server, server.client() as client:
        for page in ("/docs", "/redoc"):
            html = client.get(page, headers=key)
            assert html.status_code == 200, html.text[:200]
            urls = ASSET.findall(html.text)
            assert "/openapi.json" in urls
            assets = [u for u in urls if u != "/openapi.json"]
            assert assets and all(u.startswith(ASSETS_URL + "/") for u in assets), urls
            for url in assets:
                asset = client.get(url)
                assert asset.status_code == 200 and len(asset.content) > 1000, url
            assert "http:" not in html.text and "https:" not in html.text  # no CDN, no fonts
            assert "default-src 'self'" in html.headers["content-security-policy"]  # nor anything else
