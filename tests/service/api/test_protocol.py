"""Refusals before the app runs, against a real server: bounded request heads, malformed framing and deep
JSON all answered in the API's JSON error shape (never uvicorn's plain text, never a 500)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.factories import face
from tests.service.api.server import Server, error_of, running_server, settings_for


def exchange(server: Server, chunks: list[bytes], timeout: float = 20.0) -> tuple[int, dict[str, object]]:
    """Send ``chunks`` on one raw connection (stopping if the server closes it); the status and JSON body."""
    where = urlsplit(server.url)
    with socket.create_connection((where.hostname, where.port), timeout=timeout) as conn:
        for chunk in chunks:
            try:
                conn.sendall(chunk)
            except OSError:  # the server answered and closed while we were still sending
                break
        received = b""
        while True:
            try:
                part = conn.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not part:
                break
            received += part
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    parsed = json.loads(body)
    assert parsed["status"] == status and parsed["error"] and parsed["message"]
    return status, parsed


GET = b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n"


@pytest.mark.parametrize(
    ("chunks", "status", "error"),
    [
        ([GET + b"X-Big: " + b"a" * 200 * 1024 + b"\r\n\r\n"], 431, "headers_too_large"),
        ([GET + b"".join(b"X-%d: v\r\n" % i for i in range(2000)) + b"\r\n"], 431, "headers_too_large"),
        (
            [b"GET /tasks?" + b"q" * (4 * 1024 * 1024) + b" HTTP/1.1\r\nHost: test\r\n\r\n"],
            414,
            "uri_too_long",
        ),
        ([b"POST /search HTTP/1.1\r\nHost: test\r\nContent-Length: abc\r\n\r\n"], 400, "bad_request"),
        (
            [
                b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ],
            400,
            "bad_request",
        ),
        ([b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(120)], 400, "bad_request"),
        (
            [b"POST /search HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"],
            501,
            "unsupported_transfer_encoding",
        ),
    ],
    ids=[
        "200KiB-header",
        "2000-headers",
        "4MiB-query",
        "bad-content-length",
        "length-and-chunked",
        "tls-hello",
        "gzip-transfer-coding",
    ],
)
def test_protocol_refusals_are_json(
    shared_server: Server, chunks: list[bytes], status: int, error: str
) -> None:
    got_status, body = exchange(shared_server, chunks)
    assert (got_status, body["error"]) == (status, error)


def test_a_head_that_never_ends_is_cut_off_without_stalling_others(shared_server: Server) -> None:
    # 64 MiB of one header value: refused after about one socket read past the cap, not buffered whole.
    result: dict[str, object] = {}

    def huge() -> None:
        result["answer"] = exchange(shared_server, [GET + b"X-Big: "] + [b"a" * 65536] * 1024 + [b"\r\n\r\n"])

    thread = threading.Thread(target=huge)
    thread.start()
    with shared_server.client() as client:
        slowest = 0.0
        for _ in range(20):
            started = time.perf_counter()
            assert client.get("/v2/health/live").status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
    thread.join(timeout=60)
    assert result["answer"][0] == 431  # type: ignore[index]
    assert slowest < 2.0, slowest  # a stalled loop took seconds per probe (generous: a loaded 2-core VM)


def test_normal_requests_still_pass_under_the_limits(shared_server: Server) -> None:
    with shared_server.client() as client:
        headers = {f"X-Trace-{i}": "v" * 100 for i in range(40)}  # 40 headers, ~5 KB: well inside
        assert client.get("/tasks", headers=headers).status_code == 200


CHUNKED_SEARCH = (
    b"POST /search?task=Smiling HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
)


@pytest.mark.parametrize(
    "framing",
    [b"zz\r\n", b"5\r\n--b\r\nxx\r\n", b"4\r\n--b\r\n" + b"FFFFFFFFFFFFFFFFFFFF\r\n"],
    ids=["bad-chunk-size", "chunk-longer-than-declared", "chunk-size-overflow"],
)
def test_bad_framing_while_the_app_reads_the_body_is_one_clean_refusal(
    shared_server: Server, framing: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """The parser refuses the body after the app started on the request: the client gets the one JSON
    400, and the app's own answer, which can no longer be sent, is dropped rather than written after the
    refusal (an "unhandled error" in the log)."""
    with caplog.at_level(logging.ERROR):
        status, body = exchange(shared_server, [CHUNKED_SEARCH, framing])
        assert (status, body["error"]) == (400, "bad_request")
        time.sleep(0.5)  # the app's handler finishes after the refusal
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    with shared_server.client() as client:
        assert client.get("/v2/health/live").status_code == 200


def test_a_client_gone_mid_body_is_not_a_server_error(
    shared_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    where = urlsplit(shared_server.url)
    head = CHUNKED_SEARCH.replace(b"Transfer-Encoding: chunked", b"Content-Length: 100000")
    with caplog.at_level(logging.INFO):
        with socket.create_connection((where.hostname, where.port), timeout=10) as conn:
            conn.sendall(head + b"--b\r\nContent-Disposition: form-data; name=")
            time.sleep(0.3)  # the app is reading the body when the client goes
        time.sleep(0.5)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "client disconnected" in caplog.text
    with shared_server.client() as client:
        assert client.get("/v2/health/live").status_code == 200


def length(received: bytes) -> int:
    head = received.partition(b"\r\n\r\n")[0].lower()
    return int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])


@pytest.mark.parametrize(("path", "status"), [(b"/tasks", 200), (b"/no-such-route", 404)])
def test_a_websocket_upgrade_is_answered_as_plain_http(
    shared_server: Server, path: bytes, status: int
) -> None:
    upgrade = (
        b"GET " + path + b" HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    where = urlsplit(shared_server.url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as conn:
        conn.sendall(upgrade)  # kept open: a half-closed connection would drop the answer
        received = b""
        while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < length(received):
            part = conn.recv(65536)
            assert part, received
            received += part
    head, _, body = received.partition(b"\r\n\r\n")
    assert int(head.split(b" ", 2)[1]) == status
    assert b"content-type: application/json" in head.lower()
    json.loads(body)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_bodies_are_400(shared_server: Server) -> None:
    with shared_server.client() as client:
        body = '{"image": ' + deep(100_000) + "}"
        response = client.post(
            "/search?task=Smiling", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400 and error_of(response)["error"] == "bad_json"
        labels = '{"Smiling": ' + deep(100_000) + "}"
        upload = client.post(
            "/images", files={"images": ("a.png", face(1)[0], "image/png")}, data={"labels": labels}
        )
        assert upload.status_code == 400 and error_of(upload)["error"] == "bad_labels"


@pytest.mark.parametrize("public_docs", [False, True])
def test_api_docs_follow_the_api_key(run_dir: Path, index_dir: Path, public_docs: bool) -> None:
    settings = settings_for(run_dir, index_dir, api_key="reader-secret", public_docs=public_docs)
    with running_server(settings) as server, server.client() as client:
        for path in ("/openapi.json", "/docs", "/redoc"):
            anonymous = client.get(path)
            assert anonymous.status_code == (200 if public_docs else 401), path
            keyed = client.get(path, headers={"X-API-Key": "reader-secret"})
            assert keyed.status_code == 200, path
        spec = client.get("/openapi.json", headers={"X-API-Key": "reader-secret"}).json()
        assert "/search" in spec["paths"] and "/openapi.json" not in spec["paths"]


def test_a_head_trickled_in_is_timed_out_and_a_prompt_one_is_not(run_dir: Path, index_dir: Path) -> None:
    """Slowloris: a request head sent a byte at a time is answered 408 once ``header_timeout_s`` has
    passed since its first byte (it held its connection forever before); the same head sent within the
    time is served, on a keep-alive connection as much as on a new one."""
    settings = settings_for(run_dir, index_dir, header_timeout_s=1.0)
    with running_server(settings) as server:
        where = urlsplit(server.url)
        started = time.monotonic()
        with socket.create_connection((where.hostname, where.port), timeout=10) as conn:
            conn.sendall(b"GET /tasks HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            received = b""
            for _ in range(40):  # one byte every 0.1 s: 4 s of head if the server never cut it off
                try:
                    conn.sendall(b"a")
                except OSError:
                    break
                time.sleep(0.1)
            conn.settimeout(2)
            try:
                while part := conn.recv(65536):
                    received += part
            except (ConnectionResetError, TimeoutError):
                pass
        elapsed = time.monotonic() - started
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), received[:200]
        assert json.loads(body)["error"] == "request_timeout"
        assert elapsed < 8, elapsed  # cut off near 1 s, not at the end of the 4 s trickle (generous)
        with server.client() as client:  # keep-alive: the timer restarts with each request's first byte
            for _ in range(3):
                assert client.get("/tasks").status_code == 200
                time.sleep(0.6)
            assert client.get("/tasks").status_code == 200


def test_connections_past_the_cap_get_a_json_503_and_the_rest_are_served(
    run_dir: Path, index_dir: Path
) -> None:
    """Idle connections hold a file descriptor each until the keep-alive or head timeout: past
    ``max_connections`` open ones a new connection is answered 503 (with Retry-After) and closed, and
    once some close the server takes requests again."""
    with running_server(settings_for(run_dir, index_dir, max_connections=8)) as server:
        where = urlsplit(server.url)
        idle = [socket.create_connection((where.hostname, where.port), timeout=10) for _ in range(8)]
        try:
            time.sleep(0.3)  # the server has accepted them
            status, body = exchange(server, [GET + b"\r\n"])
            assert (status, body["error"]) == (503, "too_many_connections")
            with socket.create_connection((where.hostname, where.port), timeout=10) as refused:
                head = refused.recv(65536).partition(b"\r\n\r\n")[0].lower()
            assert head.startswith(b"http/1.1 503") and b"\r\nretry-after: 1" in head, head
            for conn in idle[:4]:
                conn.close()
            time.sleep(0.3)
            with server.client() as client:
                assert client.get("/v2/health/live").status_code == 200
        finally:
            for conn in idle:
                conn.close()


def test_silent_connections_are_closed_and_free_the_cap(run_dir: Path, index_dir: Path) -> None:
    # Sockets that never send a byte are idle from the start: closed after the keep-alive timeout, so a
    # handful of them cannot hold the connection cap and lock every client out.
    with running_server(settings_for(run_dir, index_dir, max_connections=4)) as server:
        where = urlsplit(server.url)
        silent = [socket.create_connection((where.hostname, where.port), timeout=30) for _ in range(4)]
        try:
            started = time.monotonic()
            for conn in silent:
                assert conn.recv(65536) == b""  # the server closed it (a timeout here raises)
            closed_after = time.monotonic() - started
            with server.client() as client:
                assert client.get("/v2/health/live").status_code == 200
            assert closed_after < 25, closed_after
        finally:
            for conn in silent:
                conn.close()
