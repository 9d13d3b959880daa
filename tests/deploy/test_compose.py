"""The Docker image and docker-compose.yml, run for real: build, start, serve, restart, tear down.

Needs a Docker engine with the Compose v2 plugin (CI's ``.ci/run`` starts one with
``../shared/tools/container-engine.sh up``); skipped with the reason when none answers. The demo's start-up
budget is made tiny through the compose file's ``MODRET_DEMO_*`` variables, and the torch wheel of this
machine (``/opt/wheels``) is passed to the build through ``wheels/`` when present, so that the image never
downloads a multi-GB CUDA build. Durations are printed in the test summary.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from model.data.synthfaces import render_face

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
ENGINE_STATE = Path(os.environ.get("CONTAINER_ENGINE_STATE", "/tmp/container-engine"))
CPU_WHEELS = sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-*.whl"))
SERVICE = "modret"
UP_TIMEOUT_S = 1200


def _engine_env() -> dict[str, str]:
    """The caller's environment; when it names no engine, the one container-engine.sh starts."""
    env = dict(os.environ)
    if "DOCKER_HOST" not in env and Path("/var/run/docker.sock").exists():
        env["DOCKER_HOST"] = "unix:///var/run/docker.sock"
    if "DOCKER_CONFIG" not in env and (ENGINE_STATE / "dockercfg" / "cli-plugins").is_dir():
        env["DOCKER_CONFIG"] = str(ENGINE_STATE / "dockercfg")
    return env


def _engine_problem(env: dict[str, str]) -> str | None:
    if shutil.which("docker") is None:
        return "no `docker` command"
    for args in (["docker", "info"], ["docker", "compose", "version"]):
        try:
            done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(args)}` timed out"
        if done.returncode != 0:
            return f"`{' '.join(args)}` failed: {(done.stderr or done.stdout).strip()[:200]}"
    return None


@dataclass
class Compose:
    project: str
    env: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["docker", "compose", "-p", self.project, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} exited {done.returncode}\n{done.stdout[-3000:]}\n"
                f"{done.stderr[-3000:]}\n--- logs ---\n{self.logs()[-6000:]}"
            )
        return done

    def logs(self) -> str:
        done = subprocess.run(
            ["docker", "compose", "-p", self.project, "logs", "--no-color", SERVICE],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return done.stdout + done.stderr

    def url(self) -> str:
        published = self.run("port", SERVICE, "8000").stdout.strip().splitlines()[0]
        host, _, port = published.rpartition(":")
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


@pytest.fixture(scope="module")
def compose(pytestconfig: pytest.Config) -> Iterator[Compose]:
    env = _engine_env()
    problem = _engine_problem(env)
    if problem is not None:
        pytest.skip(
            f"no container engine reachable ({problem}); start one with "
            "`source ../shared/tools/container-engine.sh up` (CI's .ci/run does) to run the compose test"
        )
    env.update(
        MODRET_PUBLISH="127.0.0.1:",  # a free host port on loopback
        MODRET_HEALTH_INTERVAL="2s",
        MODRET_DEMO_STEPS="2",
        MODRET_DEMO_WIDTH="8",
        MODRET_DEMO_IMAGES="200",
    )
    if CPU_WHEELS:  # this machine's CPU torch: no download, no multi-GB CUDA build
        wheels = ROOT / "wheels"
        wheels.mkdir(exist_ok=True)
        target = wheels / CPU_WHEELS[-1].name
        if not target.is_file() or target.stat().st_size != CPU_WHEELS[-1].stat().st_size:
            shutil.copy2(CPU_WHEELS[-1], target)
        env.update(MODRET_TORCH_INDEX_URL="", MODRET_TORCH_SPEC="torch==2.13.0")
    stack = Compose(f"modret-test-{os.getpid()}", env)
    started = time.perf_counter()
    try:
        stack.run("up", "--build", "--wait", "--wait-timeout", str(UP_TIMEOUT_S), timeout=UP_TIMEOUT_S + 60)
        stack.timings["build + up --wait"] = time.perf_counter() - started
        yield stack
    finally:
        t0 = time.perf_counter()
        stack.run("down", "-v", "--remove-orphans", timeout=180, check=False)
        stack.timings["down -v"] = time.perf_counter() - t0
        stack.timings["total"] = time.perf_counter() - started
        report_timings(pytestconfig, stack.timings)


def report_timings(config: pytest.Config, timings: dict[str, float]) -> None:
    """On the terminal (past pytest's capture) and in test-artifacts/compose-timings.json for CI."""
    line = "compose test: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "compose-timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


@pytest.fixture
def client(compose: Compose) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=compose.url(), timeout=60) as c:
        yield c


def face_png(seed: int, index: int) -> bytes:
    image, _ = render_face(seed, index, 64)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_container_serves_the_demo(compose: Compose, client: httpx.Client) -> None:
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["gallery_size"] == 200
    tasks = [t["name"] for t in client.get("/tasks").json()["tasks"]]
    assert "Smiling" in tasks and len(tasks) == 12
    assert "text/html" in client.get("/").headers["content-type"]
    health = compose.run("ps", "--format", "{{.Health}}", SERVICE).stdout.strip()
    assert health == "healthy"
    assert compose.run("exec", "-T", SERVICE, "id", "-u").stdout.strip() == "10001"  # not root
    assert "modret demo ready" in compose.logs()


def test_search(client: httpx.Client) -> None:
    response = client.post(
        "/search", params={"task": "smiling", "k": 5}, files={"image": ("q.png", face_png(1, 0), "image/png")}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "Smiling"
    scores = [r["score"] for r in body["results"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)


def test_upload_then_delete(client: httpx.Client) -> None:
    image = face_png(42, 3)
    added = client.post(
        "/images",
        files=[("images", ("new.png", image, "image/png"))],
        data={"labels": '{"Smiling": 1}'},
    )
    assert added.status_code == 201, added.text
    new_id = added.json()["items"][0]["id"]
    hits = client.post("/search", params={"task": "Smiling", "k": 1}, files={"image": ("q.png", image)})
    assert [h["id"] for h in hits.json()["results"]] == [new_id]
    assert client.get(f"/images/{new_id}/content").content == image

    assert client.delete(f"/images/{new_id}").json() == {"id": new_id, "deleted": True}
    assert client.get(f"/images/{new_id}").status_code == 404
    hits = client.post("/search", params={"task": "Smiling", "k": 5}, files={"image": ("q.png", image)})
    assert new_id not in [h["id"] for h in hits.json()["results"]]


def test_bad_input(client: httpx.Client) -> None:
    garbage = client.post(
        "/search", params={"task": "Smiling"}, files={"image": ("q.png", b"not an image", "image/png")}
    )
    assert 400 <= garbage.status_code < 500 and garbage.status_code != 404, garbage.text
    error = garbage.json()
    assert error["status"] == garbage.status_code and error["error"] and error["message"]
    unknown = client.post("/search", params={"task": "Nope"}, files={"image": ("q.png", face_png(1, 0))})
    assert unknown.status_code == 404
    assert "Smiling" in unknown.text  # the valid tasks are listed


def test_restart_reuses_the_volume(compose: Compose) -> None:
    """A restarted container finds its model and index in the volume and is ready in seconds."""
    t0 = time.perf_counter()
    compose.run("restart", SERVICE, timeout=120)
    compose.run("up", "--wait", "--wait-timeout", "120", SERVICE, timeout=180)
    compose.timings["restart until healthy"] = time.perf_counter() - t0
    logs = compose.logs()
    assert "model: reusing /data/runs/demo" in logs and "index: reusing /data/index/demo" in logs
    with httpx.Client(base_url=compose.url(), timeout=60) as client:
        assert client.get("/v2/health/ready").json()["gallery_size"] == 200


def test_deploy_docs_list_every_setting() -> None:
    """docs/deploy.md's configuration reference names every MODRET_ setting (no engine needed)."""
    from service.settings import Settings

    docs = (ROOT / "docs" / "deploy.md").read_text()
    missing = [
        f"MODRET_{name.upper()}" for name in Settings.model_fields if f"`MODRET_{name.upper()}`" not in docs
    ]
    assert not missing, f"docs/deploy.md does not document {missing}"
