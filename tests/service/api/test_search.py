"""POST /search on a real server: upload, base64 JSON, by_id, combined and negative tasks, explain,
filters, paging; GET /tasks."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.factories import TASKS, face
from tests.service.api.server import Server, error_of


def post(server: Server, params: Any, image: bytes | None = None, **kwargs: Any) -> httpx.Response:
    files = {"image": ("q.png", image, "image/png")} if image is not None else None
    with server.client() as client:
        return client.post("/search", params=params, files=files, **kwargs)


@pytest.fixture(scope="module")
def query() -> bytes:
    return face(500)[0]


def test_upload_search_shape(shared_server: Server, query: bytes) -> None:
    response = post(shared_server, {"task": "Smiling", "k": 5}, query)
    assert response.status_code == 200
    body = response.json()
    assert body["task"] == "Smiling"
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    first = body["results"][0]
    assert set(first) >= {"id", "rank", "score", "labels", "image_url"}
    assert set(first["labels"]) == set(TASKS)
    assert body["model"]["hash"] and body["model"]["name"]
    assert body["index_generation"] >= 1
    assert set(body["timing_ms"]) == {"decode", "queue", "embed", "search", "respond"}
    assert body["timing_ms"]["embed"] > 0
    with shared_server.client() as client:
        content = client.get(first["image_url"])
    assert content.status_code == 200 and content.headers["content-type"] == "image/png"


def wrapped(text: str, width: int = 76) -> str:
    return "\n".join(text[i : i + width] for i in range(0, len(text), width)) + "\n"


@pytest.mark.parametrize(
    "encode",
    [
        lambda data: base64.b64encode(data).decode(),
        lambda data: wrapped(base64.b64encode(data).decode()),  # as `base64 FILE` prints it
        lambda data: base64.urlsafe_b64encode(data).decode().rstrip("="),
        lambda data: "data:image/png;base64," + base64.b64encode(data).decode(),
    ],
    ids=["standard", "mime-wrapped", "url-safe-unpadded", "data-url"],
)
def test_json_base64_gives_the_same_answer(
    shared_server: Server, query: bytes, encode: Callable[[bytes], str]
) -> None:
    multipart = post(shared_server, {"task": "Eyeglasses", "k": 4}, query).json()
    as_json = post(shared_server, {"task": "Eyeglasses", "k": 4}, json={"image": encode(query)})
    assert as_json.status_code == 200
    assert [r["id"] for r in as_json.json()["results"]] == [r["id"] for r in multipart["results"]]


def test_by_id_uses_the_stored_vector_and_excludes_the_item(shared_server: Server) -> None:
    data, _ = face(0)  # gallery item 1 is face 0
    by_upload = post(shared_server, {"task": "Black_Hair", "k": 6}, data).json()["results"]
    assert by_upload[0]["id"] == 1 and by_upload[0]["score"] == pytest.approx(1.0, abs=1e-4)
    by_id = post(shared_server, {"task": "Black_Hair", "k": 5, "by_id": 1})
    assert by_id.status_code == 200
    body = by_id.json()
    assert body["query_id"] == 1 and body["timing_ms"]["embed"] == 0
    assert [r["id"] for r in body["results"]] == [r["id"] for r in by_upload[1:]]
    for a, b in zip(body["results"], by_upload[1:], strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_tasks_give_different_rankings(shared_server: Server, query: bytes) -> None:
    rankings = {
        t: [r["id"] for r in post(shared_server, {"task": t, "k": 24}, query).json()["results"]]
        for t in TASKS
    }
    assert len({tuple(r) for r in rankings.values()}) > 1


def test_combined_tasks_rank_by_weighted_sum(shared_server: Server, query: bytes) -> None:
    params = [("task", "Smiling:1"), ("task", "eyeglasses:-1"), ("k", "24"), ("explain", "true")]
    response = post(shared_server, params, query)
    assert response.status_code == 200
    body = response.json()
    assert body["task"] == "Smiling:1,Eyeglasses:-1"
    assert len(body["results"]) == 24  # the whole gallery: candidates from both tasks
    for hit in body["results"]:
        sims = hit["similarities"]
        assert set(sims) == set(TASKS)
        assert hit["score"] == pytest.approx(sims["Smiling"] - sims["Eyeglasses"], abs=1e-4)
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_weights_scale_single_task_scores(shared_server: Server, query: bytes) -> None:
    plain = post(shared_server, {"task": "Smiling", "k": 3}, query).json()["results"]
    double = post(shared_server, {"task": "Smiling:2", "k": 3}, query).json()["results"]
    assert [h["id"] for h in plain] == [h["id"] for h in double]
    assert double[0]["score"] == pytest.approx(2 * plain[0]["score"], abs=1e-4)
    negative = post(shared_server, {"task": "Smiling:-1", "k": 24}, query).json()["results"]
    assert [h["id"] for h in negative][-3:] == [h["id"] for h in plain][::-1]


def test_explain_single_task(shared_server: Server, query: bytes) -> None:
    hits = post(shared_server, {"task": "Wearing_Hat", "k": 3, "explain": "true"}, query).json()["results"]
    for hit in hits:
        assert hit["similarities"]["Wearing_Hat"] == pytest.approx(hit["score"], abs=1e-5)


def test_offset_min_score_and_filters(shared_server: Server, query: bytes) -> None:
    full = post(shared_server, {"task": "Smiling", "k": 10}, query).json()["results"]
    page = post(shared_server, {"task": "Smiling", "k": 5, "offset": 5}, query).json()["results"]
    assert [h["id"] for h in page] == [h["id"] for h in full[5:]]
    assert [h["rank"] for h in page] == [6, 7, 8, 9, 10]
    threshold = (full[3]["score"] + full[4]["score"]) / 2  # scores in responses are rounded
    above = post(shared_server, {"task": "Smiling", "k": 10, "min_score": threshold}, query).json()["results"]
    assert [h["id"] for h in above] == [h["id"] for h in full[:4]]
    filtered = post(shared_server, [("task", "Smiling"), ("k", "24"), ("filter", "eyeglasses:1")], query)
    assert filtered.status_code == 200
    hits = filtered.json()["results"]
    assert hits and all(h["labels"]["Eyeglasses"] == 1 for h in hits)
    both = post(
        shared_server,
        [("task", "Smiling"), ("k", "24"), ("filter", "Eyeglasses:1"), ("filter", "Smiling:1")],
        query,
    )
    assert all(h["labels"]["Eyeglasses"] == 1 and h["labels"]["Smiling"] == 1 for h in both.json()["results"])
    none = post(shared_server, [("task", "Smiling"), ("filter", "Eyeglasses:7")], query)
    assert none.status_code == 200 and none.json()["results"] == []


def test_k_larger_than_the_gallery(shared_server: Server, query: bytes) -> None:
    hits = post(shared_server, {"task": "Smiling", "k": 1000}, query).json()["results"]
    assert len(hits) == 24


def test_tasks_endpoints(shared_server: Server) -> None:
    with shared_server.client() as client:
        listing = client.get("/tasks").json()
        assert [t["name"] for t in listing["tasks"]] == TASKS
        first = listing["tasks"][0]
        assert first["gallery_size"] == 24 and first["accuracy"] == pytest.approx(0.5)
        assert first["description"]
        one = client.get("/tasks/wearing_HAT")
        assert one.status_code == 200 and one.json()["name"] == "Wearing_Hat"
        missing = client.get("/tasks/Wings")
        assert missing.status_code == 404
        assert error_of(missing)["details"]["valid_tasks"] == TASKS
