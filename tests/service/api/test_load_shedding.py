"""Load shedding on a real server: while the model is busy, searches past the queue's bound are answered
503 with Retry-After and the JSON error at once (not after the queue drains), the ones within it are
served, and the refusals are counted in ``/metrics``."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import httpx
import pytest
import torch

from service.runtime.batcher import EmbedResult
from service.runtime.loaded import Loaded
from tests.factories import face
from tests.service.api.server import Server, error_of, running_server, settings_for

BUSY_IMAGES = 4000  # one direct job of this many images keeps the tiny model busy for a while


def test_overload_is_shed_early_with_retry_after(run_dir: Path, index_dir: Path) -> None:
    settings = settings_for(run_dir, index_dir, max_queued_rows=3, retry_after_s=2)
    with running_server(settings) as server:
        loaded = server.app.state.modret.loaded
        assert isinstance(loaded, Loaded)
        batcher = loaded.batcher
        assert batcher.max_queued_rows == settings.max_queued_rows  # the setting reaches the batcher
        size = loaded.run.preprocess.image_size
        busy = batcher.submit(torch.zeros((BUSY_IMAGES, 3, size, size), dtype=torch.uint8), None)
        while batcher.queue_depth():
            time.sleep(0.001)  # the worker has taken the big job
        image = face(400)[0]
        start = threading.Barrier(8)

        def one(_: int) -> tuple[httpx.Response, bool]:
            start.wait()
            with server.client() as client:
                response = client.post(
                    "/search", params={"task": "Smiling"}, files={"image": ("q.png", image)}
                )
            return response, busy.done()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(8)))
        served = [r for r, _ in answers if r.status_code == 200]
        shed = [(r, busy_done) for r, busy_done in answers if r.status_code == 503]
        assert len(served) == 3 and len(shed) == 5, [r.status_code for r, _ in answers]
        for response, busy_done in shed:
            assert not busy_done  # refused while the model was still busy: no waiting in line
            assert response.headers["retry-after"] == "2"
            body = error_of(response)
            assert body["error"] == "overloaded" and "image-task rows" in body["message"]
        assert busy.result(timeout=120).vectors.shape[0] == BUSY_IMAGES
        with server.client() as client:
            metrics = client.get("/metrics").text
            assert 'modret_rejects_total{reason="unavailable"} 5.0' in metrics
            after = client.post("/search", params={"task": "Smiling"}, files={"image": ("q.png", image)})
        assert after.status_code == 200  # the queue drained: served again


@pytest.mark.parametrize("target", ["/search?task=Smiling", "/images"])
def test_an_overloaded_upload_is_refused_before_its_body_is_read(
    run_dir: Path, index_dir: Path, target: str
) -> None:
    # The head announces a body that never comes: only a refusal made before reading it can answer, so
    # clients that resend at once under overload cost the server no upload and no thread hop.
    settings = settings_for(run_dir, index_dir, max_queued_rows=1, retry_after_s=3)
    with running_server(settings) as server:
        batcher = server.app.state.modret.loaded.batcher
        size = server.app.state.modret.loaded.run.preprocess.image_size
        busy = batcher.submit(torch.zeros((BUSY_IMAGES, 3, size, size), dtype=torch.uint8), None)
        while batcher.queue_depth():
            time.sleep(0.001)  # the worker has taken the big job
        queued = batcher.submit(torch.zeros((1, 3, size, size), dtype=torch.uint8), (0,))  # the bound's row
        host, port = server.url.removeprefix("http://").split(":")
        head = (
            f"POST {target} HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(head.encode())
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
        status_line, *headers = answer.split(b"\r\n\r\n")[0].decode().split("\r\n")
        assert status_line.startswith("HTTP/1.1 503"), answer[:500]
        assert "retry-after: 3" in [h.lower() for h in headers], headers
        assert not busy.done()  # answered while the model was still busy, not once the queue drained
        assert queued.result(timeout=120).vectors.shape[0] == 1
        assert busy.result(timeout=120).vectors.shape[0] == BUSY_IMAGES


def _overload(server: Server) -> tuple[Future[EmbedResult], Future[EmbedResult]]:
    """Keep the model busy with one big direct job and fill a 1-row bound: every search is refused."""
    batcher = server.app.state.modret.loaded.batcher
    size = server.app.state.modret.loaded.run.preprocess.image_size
    busy = batcher.submit(torch.zeros((BUSY_IMAGES, 3, size, size), dtype=torch.uint8), None)
    while batcher.queue_depth():
        time.sleep(0.001)  # the worker has taken the big job
    return busy, batcher.submit(torch.zeros((1, 3, size, size), dtype=torch.uint8), (0,))


@pytest.mark.parametrize("pace", [True, False])
def test_a_connection_that_ignores_retry_after_is_paced_to_it(
    run_dir: Path, index_dir: Path, pace: bool
) -> None:
    settings = settings_for(run_dir, index_dir, max_queued_rows=1, retry_after_s=1, pace_early_retries=pace)
    image = face(400)[0]
    with running_server(settings) as server:
        busy, queued = _overload(server)
        with server.client() as client, server.client() as other:
            post = lambda c: c.post("/search", params={"task": "Smiling"}, files={"image": ("q.png", image)})  # noqa: E731
            first = post(client)
            elsewhere = post(other)  # another connection's first refusal is not held
            assert not busy.done()  # refused while the model was still busy
            started = time.monotonic()
            again = post(client)  # at once, on the same connection, as if Retry-After were not there
            held = time.monotonic() - started  # refused at once; only its sending may wait
            assert [first.status_code, elsewhere.status_code, again.status_code] == [503] * 3
            assert error_of(again)["error"] == "overloaded" and again.headers["retry-after"] == "1"
            if pace:
                assert held >= 0.8, held  # the second refusal waited out the Retry-After of the first
            busy.result(timeout=120)
            queued.result(timeout=120)
            served = post(client)  # on the paced connection, within its Retry-After: served, not held
            assert served.status_code == 200, served.text[:300]
        if not pace:
            assert held < 0.8, held


def test_refusals_other_than_overload_are_never_held(run_dir: Path, index_dir: Path) -> None:
    # A readiness probe (or a client waiting for a start) polls as fast as it likes on one connection.
    with running_server(settings_for(run_dir, index_dir)) as server, server.client() as client:
        server.app.state.modret.draining = True  # readiness answers 503 with Retry-After from now on
        try:
            started = time.monotonic()
            answers = [client.get("/v2/health/ready") for _ in range(3)]
            elapsed = time.monotonic() - started
        finally:
            server.app.state.modret.draining = False
        assert [a.status_code for a in answers] == [503] * 3 and answers[0].headers["retry-after"]
        assert elapsed < 1.5, elapsed  # held, the second and third would each wait out the first's 1 s
        assert client.get("/v2/health/ready").status_code == 200
