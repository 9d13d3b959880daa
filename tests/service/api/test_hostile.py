"""Hostile and malformed requests against a real server: each gets the right 4xx with a JSON error,
never a 5xx, and the server keeps answering afterwards."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.factories import face
from tests.service import payloads
from tests.service.api.server import Server, error_of

BODY_CAP = 256 * 1024  # shared_server's max_body_bytes
PIXEL_CAP = 1_000_000  # shared_server's max_image_pixels


def upload(data: bytes, name: str = "query.jpg", mime: str = "image/jpeg") -> dict[str, Any]:
    return {"image": (name, data, mime)}


def search(server: Server, params: Any = None, **kwargs: Any) -> httpx.Response:
    with server.client() as client:
        return client.post("/search", params=params if params is not None else {"task": "Smiling"}, **kwargs)


def assert_still_serving(server: Server) -> None:
    with server.client() as client:
        assert client.get("/v2/health/ready").status_code == 200
        ok = client.post("/search", params={"task": "Smiling", "k": 2}, files=upload(face(3)[0], "f.png"))
        assert ok.status_code == 200, ok.text


CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("empty body", {"content": b""}, 400, "missing_image"),
    (
        "empty json content type",
        {"content": b"", "headers": {"content-type": "application/json"}},
        400,
        "empty_body",
    ),
    ("zero-byte file", {"files": upload(b"")}, 400, "empty_image"),
    ("text named .jpg", {"files": upload(b"hello, I am not a picture\n" * 4)}, 415, "unsupported_media_type"),
    ("truncated jpeg", {"files": upload(payloads.truncated_jpeg())}, 400, "corrupt_image"),
    (
        "png declaring 100000x100000",
        {"files": upload(payloads.png_claiming(100_000, 100_000), "b.png")},
        413,
        "",
    ),
    (
        "just over the pixel cap",
        {"files": upload(payloads.blank_png(1001, 1000), "c.png")},
        413,
        "image_too_large",
    ),
    ("tiff", {"files": upload(payloads.tiff(), "x.tif", "image/tiff")}, 415, "unsupported_media_type"),
    ("fits", {"files": upload(payloads.fits(), "x.fits", "image/fits")}, 415, "unsupported_media_type"),
    (
        "multipart without image field",
        {"files": {"other": ("a.png", b"x", "image/png")}},
        400,
        "missing_image",
    ),
    (
        "image as a text part (no filename)",
        {"files": {"image": (None, payloads.blank_png(8, 8))}},
        400,
        "missing_image",
    ),
    ("png signature only", {"files": upload(b"\x89PNG\r\n\x1a\n", "s.png")}, 400, "corrupt_image"),
    ("json not an object", {"json": [1, 2]}, 400, "bad_json"),
    ("json bad base64", {"json": {"image": "%%%not base64%%%"}}, 400, "bad_base64"),
    ("json base64 of text", {"json": {"image": base64.b64encode(b"plain text").decode()}}, 415, ""),
    ("invalid json", {"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, "bad_json"),
    ("unsupported content type", {"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, ""),
    (
        "compressed body",
        {
            "content": b"\x1f\x8b\x08\x00",
            "headers": {"content-type": "application/json", "content-encoding": "gzip"},
        },
        415,
        "unsupported_content_encoding",
    ),
    ("body over cap with length", {"files": upload(b"\xff\xd8\xff" + b"\0" * (BODY_CAP + 10))}, 413, ""),
]


@pytest.mark.parametrize(("name", "request_kwargs", "status", "code"), CASES, ids=[c[0] for c in CASES])
def test_bad_inputs_get_json_4xx(
    shared_server: Server, name: str, request_kwargs: dict[str, Any], status: int, code: str
) -> None:
    response = search(shared_server, **request_kwargs)
    assert response.status_code == status, (name, response.text[:300])
    body = error_of(response)
    if code:
        assert body["error"] == code
    assert response.headers.get("x-request-id") == body["request_id"]
    assert " at 0x" not in body["message"] and "Error" not in body["message"], body  # no decoder internals


def test_oversized_chunked_upload_without_length(shared_server: Server) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(64):  # 4 MiB offered, 16x the cap
            sent += 65536
            yield b"\0" * 65536

    started = time.perf_counter()
    response = search(shared_server, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "content-length" not in response.request.headers
    assert error_of(response)["error"] == "payload_too_large"
    assert time.perf_counter() - started < 10
    assert_still_serving(shared_server)


def test_chunked_multipart_over_cap(shared_server: Server) -> None:
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'

    def chunks() -> Iterator[bytes]:
        yield head.encode() + b"\xff\xd8\xff"
        for _ in range(16):
            yield b"\1" * 65536

    response = search(
        shared_server, content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 413
    error_of(response)


def test_ten_thousand_empty_parts_refused_quickly(shared_server: Server) -> None:
    body, content_type = payloads.empty_parts_multipart(10_000)
    assert len(body) < BODY_CAP * 4
    started = time.perf_counter()
    for path in ("/search", "/images"):
        with shared_server.client() as client:
            response = client.post(
                path, params={"task": "Smiling"}, content=body, headers={"content-type": content_type}
            )
        assert response.status_code in (400, 413), response.text[:200]
        error_of(response)
    assert time.perf_counter() - started < 10
    assert_still_serving(shared_server)


def test_many_parts_within_the_body_cap_hit_the_part_cap(shared_server: Server) -> None:
    body, content_type = payloads.empty_parts_multipart(500)
    assert len(body) < BODY_CAP
    response = search(shared_server, content=body, headers={"content-type": content_type})
    assert response.status_code in (400, 413)
    assert "part" in error_of(response)["message"].lower() or "field" in response.text.lower()


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (payloads.cmyk_jpeg(), "cmyk.jpg"),
        (payloads.palette_alpha_png(), "pa.png"),
        (payloads.rgba_webp(), "a.webp"),
    ],
    ids=["cmyk", "palette-alpha", "rgba-webp"],
)
def test_unusual_modes_are_accepted(shared_server: Server, data: bytes, name: str) -> None:
    response = search(shared_server, {"task": "Smiling", "k": 3}, files=upload(data, name))
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 3


@pytest.mark.parametrize("shape", [(1, 500_000), (500_000, 1)], ids=["1x500000", "500000x1"])
def test_extreme_aspect_strips_are_searched(shared_server: Server, shape: tuple[int, int]) -> None:
    """A strip of a few kilobytes under the pixel cap: its centre square is embedded (no resized
    intermediate of gigabytes)."""
    data = payloads.blank_png(*shape)
    response = search(shared_server, {"task": "Smiling", "k": 2}, files=upload(data, "strip.png"))
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2
    assert_still_serving(shared_server)


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"task": "Nonexistent"}, 404),
        ({}, 422),
        ([("task", "Smiling"), ("task", "Smiling")], 422),
        ([("task", "Smiling"), ("task", "smiling:2")], 422),
        ({"task": "Smiling:abc"}, 422),
        ({"task": "Smiling:0"}, 422),
        ({"task": "Smiling:nan"}, 422),
        ({"task": "Smiling:1e-320"}, 422),
        ({"task": "Smiling:1_0"}, 422),  # float() would read 10
        ({"task": "Smiling: 1"}, 422),
        ({"task": "Smiling:-1e308"}, 422),
        ({"task": "Smiling", "k": 0}, 422),
        ({"task": "Smiling", "k": -1}, 422),
        ({"task": "Smiling", "k": 10**9}, 422),
        ({"task": "Smiling", "k": "abc"}, 422),
        ({"task": "Smiling", "offset": -3}, 422),
        ({"task": "Smiling", "min_score": "inf"}, 422),
        ({"task": "Smiling", "filter": "Smiling"}, 422),
        ({"task": "Smiling", "filter": "Smiling:"}, 422),
        ({"task": "Smiling", "filter": "Smiling:1\x00"}, 422),
        ({"task": "Smiling", "filter": "No_Such_Label:1"}, 422),
        ({"task": "Smiling", "by_id": 999_999}, 404),
        ({"task": "Smiling", "by_id": -1}, 422),
        ({"task": "Smiling", "by_id": 2**70}, 422),
        ({"task": "Smiling", "by_id": "1.0"}, 422),
        ({"task": "Smiling", "by_id": "+1"}, 422),
        ({"task": "Smiling", "explain": "maybe"}, 422),
    ],
    ids=lambda value: str(value),
)
def test_bad_parameters(shared_server: Server, params: Any, status: int) -> None:
    response = search(shared_server, params, files=upload(face(1)[0], "f.png"))
    assert response.status_code == status, response.text
    error_of(response)


def test_unknown_task_lists_the_valid_ones(shared_server: Server) -> None:
    response = search(shared_server, {"task": "Wings"}, files=upload(face(1)[0], "f.png"))
    body = error_of(response)
    assert response.status_code == 404
    assert body["error"] == "unknown_task"
    assert body["details"]["valid_tasks"] == ["Smiling", "Eyeglasses", "Black_Hair", "Wearing_Hat"]
    assert "Smiling" in body["message"]


def test_oddly_cased_task_matches(shared_server: Server) -> None:
    response = search(shared_server, {"task": "bLaCk_hAiR", "k": 2}, files=upload(face(1)[0], "f.png"))
    assert response.status_code == 200
    assert response.json()["task"] == "Black_Hair"


def test_unknown_routes_and_methods_are_json(shared_server: Server) -> None:
    with shared_server.client() as client:
        assert error_of(client.get("/nope")).get("status") == 404
        assert error_of(client.put("/search")).get("status") == 405
        assert client.get("/images/abc").status_code == 422
        for lax in ("1.0", "+1", "%201", "1e0", "0x1"):  # not the image 1, which exists
            assert error_of(client.get(f"/images/{lax}"))["status"] == 422, lax
        assert client.get("/images/1").status_code == 200
        assert client.get("/static/../settings.py").status_code == 404
        assert client.get("/static/index.html").status_code == 404  # only the listed files


def raw_request(server: Server, head: str, body: bytes = b"") -> bytes:
    """Send bytes httpx would refuse to produce; return what the server answered."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"}" in chunk:
                break
    return b"".join(chunks)


@pytest.mark.parametrize(
    ("length", "status"), [(str(BODY_CAP * 100), b"413"), ("12abc", b"400")], ids=["huge", "not-a-number"]
)
def test_declared_content_length_is_checked_before_reading(
    shared_server: Server, length: str, status: bytes
) -> None:
    head = (
        "POST /search?task=Smiling HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        f"Content-Length: {length}\n"
    )
    answer = raw_request(shared_server, head, b"{}")
    assert (
        answer.split(b" ")[1] == status or b"400 Bad Request" in answer
    )  # uvicorn may refuse a bad header itself
    assert_still_serving(shared_server)
