"""Load shedding on a real server: while the model is busy, searches past the queue's bound are answered
503 with Retry-After and the JSON error at once (not after the queue drains), the ones within it are
served, and the refusals are counted in ``/metrics``."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import httpx
import torch

from service.runtime.loaded import Loaded
from tests.factories import face
from tests.service.api.server import error_of, running_server, settings_for

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
