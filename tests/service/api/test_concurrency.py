"""Many parallel searches while images are added and deleted: every response is valid, and the final
gallery (metadata, every task's index, and what search returns) is exactly what was acknowledged."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import httpx

from index.gallery import Gallery
from tests.factories import GALLERY_SIZE, TASKS, face
from tests.service.api.server import running_server, settings_for


def check_search(response: httpx.Response, k: int) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    hits = body["results"]
    assert len(hits) <= k
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    assert len({h["id"] for h in hits}) == len(hits)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0001 <= s <= 1.0001 for s in scores)


def test_searches_during_adds_and_deletes(run_dir: Path, index_dir: Path) -> None:
    settings = settings_for(run_dir, index_dir, max_batch_size=8, max_wait_ms=3)
    queries = [face(2000 + i)[0] for i in range(4)]
    uploads = [face(3000 + i)[0] for i in range(12)]
    stop = threading.Event()
    added: list[int] = []
    deleted: list[int] = []
    with running_server(settings) as server:

        def searcher(n: int) -> int:
            done = 0
            with server.client() as client:
                while not stop.is_set() or done < 3:
                    params: list[tuple[str, str]] = [("task", TASKS[(n + done) % 4]), ("k", "10")]
                    if done % 3 == 1:
                        params += [("task", f"{TASKS[(n + done + 1) % 4]}:-0.5"), ("explain", "true")]
                    image = queries[(n + done) % len(queries)]
                    check_search(
                        client.post("/search", params=params, files={"image": ("q.png", image, "image/png")}),
                        10,
                    )
                    done += 1
            return done

        def writer() -> None:
            with server.client() as client:
                for i, data in enumerate(uploads):
                    response = client.post("/images", files={"images": (f"u{i}.png", data, "image/png")})
                    assert response.status_code == 201, response.text
                    item = response.json()["items"][0]
                    assert not item["duplicate"]
                    added.append(item["id"])
                    victim = added[0] if i % 3 == 2 else i + 1  # some new uploads, some original items
                    assert client.delete(f"/images/{victim}").status_code == 200
                    deleted.append(victim)
                    if victim in added:
                        added.remove(victim)
            stop.set()

        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            searches = [pool.submit(searcher, n) for n in range(8)]
            pool.submit(writer).result(timeout=120)
            total_searches = sum(f.result(timeout=120) for f in searches)
        assert total_searches >= 24

        originals = set(range(1, GALLERY_SIZE + 1))
        expected = (originals | set(added)) - set(deleted)
        with server.client() as client:
            listed = client.get("/images", params={"limit": 500}).json()
            assert {i["id"] for i in listed["items"]} == expected and listed["total"] == len(expected)
            for task in TASKS:
                assert client.get(f"/tasks/{task}").json()["gallery_size"] == len(expected)
                query = {"image": ("q.png", queries[0], "image/png")}
                found = client.post("/search", params={"task": task, "k": 1000}, files=query).json()[
                    "results"
                ]
                assert {h["id"] for h in found} == expected

    reopened = Gallery.open(index_dir)
    try:
        assert set(reopened.metadata.ids().tolist()) == expected
        for task in TASKS:
            assert set(reopened.store.ids(task).tolist()) == expected
    finally:
        reopened.close()
