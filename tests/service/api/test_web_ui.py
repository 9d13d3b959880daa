"""The web UI in headless Chromium: pick a task, upload a query image, see results with "why similar"
bars; add an image to the gallery. Driven through chromedriver's W3C WebDriver HTTP API with httpx (no
extra dependency). The screenshot is saved as test-artifacts/web-ui.png. Skipped without Chromium."""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.factories import face
from tests.service.api.server import Server, free_socket, running_server, settings_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element key

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromedriver not installed (apt-get install chromium chromium-driver)",
)


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
            "--window-size=1280,1000",
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


def test_search_from_the_web_ui(browser: Browser, ui_server: Server, tmp_path: Path) -> None:
    query = tmp_path / "query.png"
    query.write_bytes(face(300)[0])
    browser.open(ui_server.url + "/")
    browser.wait_for(lambda: browser.text(browser.find("#status")) == "ready", "tasks and gallery to load")
    assert len(browser.find_all("#gallery .thumb img")) == 24

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
    assert len(browser.find_all("#results .result .bar")) == 12 * 4  # why-similar bars, every task
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

    new_image = tmp_path / "new.png"
    new_image.write_bytes(face(301)[0])
    browser.type_into(browser.find("#upload"), str(new_image), clear=False)
    browser.wait_for(lambda: "added 1 image" in browser.text(browser.find("#status")), "the upload")
    with ui_server.client() as client:
        assert client.get("/images").json()["total"] == 25
