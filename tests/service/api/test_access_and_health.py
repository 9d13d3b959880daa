"""API keys, CORS, health, readiness while draining, metrics, queue-full 503, graceful shutdown."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from index.gallery import Gallery
from service.api.deps import ServiceState
from tests.factories import face
from tests.service.api.server import Server, error_of, running_server, settings_for


def test_api_keys(run_dir: Path, index_dir: Path) -> None:
    settings = settings_for(run_dir, index_dir, api_key="reader-secret", admin_key="admin-secret")
    png = face(700)[0]
    with running_server(settings) as server, server.client() as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/").status_code == 200  # the UI page holds no data; the key is typed into it
        protected = [
            ("GET", "/tasks"), ("GET", "/images"), ("GET", "/metrics"), ("GET", "/images/1/content"),
            ("POST", "/search?task=Smiling"), ("DELETE", "/images/1"), ("POST", "/images"),
        ]  # fmt: skip
        for method, path in protected:
            missing = client.request(method, path)
            assert missing.status_code == 401, (method, path)
            assert error_of(missing)["message"].startswith("missing")
            wrong = client.request(method, path, headers={"X-API-Key": "reader-secreT"})
            assert wrong.status_code == 401 and error_of(wrong)["message"] == "wrong API key"
        reader = {"X-API-Key": "reader-secret"}
        admin = {"X-API-Key": "admin-secret"}
        assert client.get("/tasks", headers=reader).status_code == 200
        assert client.get("/tasks", headers=admin).status_code == 200
        search = client.post(
            "/search?task=Smiling", headers=reader, files={"image": ("q.png", png, "image/png")}
        )
        assert search.status_code == 200
        upload = {"images": ("n.png", png, "image/png")}
        assert client.post("/images", headers=reader, files=upload).status_code == 403
        assert client.delete("/images/1", headers=reader).status_code == 403
        assert client.post("/images", headers=admin, files=upload).status_code == 201
        assert client.delete("/images/1", headers=admin).status_code == 200
        # CORS is off unless configured
        preflight = client.options(
            "/search", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in preflight.headers


def test_cors_when_configured(run_dir: Path, index_dir: Path) -> None:
    settings = settings_for(run_dir, index_dir, cors_origins=["http://ui.example"])
    with running_server(settings) as server, server.client() as client:
        ok = client.get("/tasks", headers={"Origin": "http://ui.example"})
        assert ok.headers["access-control-allow-origin"] == "http://ui.example"
        other = client.get("/tasks", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_metrics_after_traffic(run_dir: Path, index_dir: Path) -> None:
    with running_server(settings_for(run_dir, index_dir)) as server, server.client() as client:
        client.post(
            "/search", params={"task": "smiling"}, files={"image": ("q.png", face(9)[0], "image/png")}
        )
        client.post("/search", params={"task": "Smiling"}, files={"image": ("q.txt", b"text", "text/plain")})
        client.get("/images/424242")
        text = client.get("/metrics").text
    assert 'modret_request_duration_seconds_count{route="/search",status="200",task="Smiling"} 1.0' in text
    assert 'modret_request_duration_seconds_count{route="/search",status="415",task="Smiling"} 1.0' in text
    assert 'route="/images/{image_id}",status="404"' in text
    assert 'modret_gallery_size{task="Eyeglasses"} 24.0' in text
    assert 'modret_rejects_total{reason="unsupported_media_type"} 1.0' in text
    for name in ("modret_queue_seconds_count", "modret_embed_seconds_count", "modret_batch_size_count"):
        assert name in text


def test_full_queue_answers_503_with_retry_after_at_once(run_dir: Path, index_dir: Path) -> None:
    settings = settings_for(run_dir, index_dir, max_queue=1, max_batch_size=1)
    with running_server(settings) as server, server.client() as client:
        state: ServiceState = server.app.state.modret
        assert state.loaded is not None
        batcher = state.loaded.batcher
        busy = batcher.submit(torch.zeros((3000, 3, 32, 32)), None)  # hundreds of ms of work
        while batcher.queue_depth():
            time.sleep(0.001)
        queued = batcher.submit(torch.zeros((3000, 3, 32, 32)), None)  # fills the one queue slot
        started = time.perf_counter()
        response = client.post(
            "/search", params={"task": "Smiling"}, files={"image": ("q.png", face(1)[0], "image/png")}
        )
        elapsed = time.perf_counter() - started
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert error_of(response)["error"] == "overloaded"
        assert elapsed < 0.5 and not queued.done()
        busy.result(timeout=60)
        queued.result(timeout=60)
        assert (
            client.post(
                "/search", params={"task": "Smiling"}, files={"image": ("q.png", face(1)[0], "image/png")}
            ).status_code
            == 200
        )
        assert 'modret_rejects_total{reason="unavailable"} 1.0' in client.get("/metrics").text


def test_graceful_shutdown_drains_and_saves(run_dir: Path, index_dir: Path) -> None:
    before = Gallery.open(index_dir)
    generation = before.store.manifest.generation if before.store.manifest else 0
    before.close()
    settings = settings_for(run_dir, index_dir, drain_delay_s=1.0)
    with running_server(settings) as server, server.client() as client:
        assert client.delete("/images/2").status_code == 200  # durable, but the store saves at shutdown
        results: list[int] = []

        def searches() -> None:
            with server.client() as own:
                for _ in range(5):
                    r = own.post(
                        "/search",
                        params={"task": "Smiling"},
                        files={"image": ("q.png", face(3)[0], "image/png")},
                    )
                    results.append(r.status_code)

        worker = threading.Thread(target=searches)
        worker.start()
        server.server.request_exit()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ready = client.get("/v2/health/ready")
            if ready.status_code == 503:
                break
        assert ready.status_code == 503 and "shutting down" in error_of(ready)["message"]
        assert client.get("/v2/health/live").status_code == 200  # still serving during the drain delay
        worker.join(30)
        assert results == [200] * 5
        server.thread.join(30)
        assert not server.thread.is_alive()
    after = Gallery.open(index_dir)
    try:
        assert after.store.manifest is not None and after.store.manifest.generation > generation
        assert after.store.count("Smiling") == 23 and 2 not in after.store.ids("Smiling").tolist()
    finally:
        after.close()


def test_health_routes(shared_server: object) -> None:
    from tests.service.api.server import Server

    assert isinstance(shared_server, Server)
    with shared_server.client() as client:
        assert client.get("/v2/health/live").json() == {"status": "live"}
        ready = client.get("/v2/health/ready").json()
        assert ready["status"] == "ready" and ready["tasks"] == 4 and ready["gallery_size"] == 24
        assert ready["index_generation"] >= 1


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/", "/tasks", "/images/1/content"])
def test_head_answers_as_get_without_a_body(shared_server: Server, path: str) -> None:
    with shared_server.client() as client:
        got, head = client.get(path), client.head(path)
    assert got.status_code == head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert int(head.headers["content-length"]) == len(got.content)


def test_head_on_a_post_only_route_is_405(shared_server: Server) -> None:
    with shared_server.client() as client:
        response = client.head("/search")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
