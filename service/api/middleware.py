"""The app's ASGI middleware, outermost first: request log → body limit → request timeout → retry pacing →
HEAD as GET.

- **Request log.** The request id is the client's ``X-Request-ID`` when it is short and plain, a fresh one
  otherwise; it is echoed in the response header and in error bodies. Routes add the task they served with
  ``note_task``. One structured line per request and the latency metric; logged: method, route template,
  path, status, latency, task, request id — never bodies, queries or keys.
- **Body limit.** A declared ``Content-Length`` over the cap is refused before reading anything. Otherwise
  the bytes of every ``http.request`` message are counted as the application reads them; the read that
  crosses the cap raises ``BodyTooLarge`` inside the application, whatever the application answers is
  dropped, and the client gets 413. The rest of the body is read and discarded (up to ``drain_bytes``) so
  that a client still writing gets to read the 413 instead of a connection reset.
- **Request timeout.** Past ``timeout_s`` the request is cancelled and, when no response has started yet,
  answered 504 with a JSON error (work already handed to a thread finishes there and is discarded).
- **Retry pacing.** A connection refused as overloaded (a 503 with ``Retry-After``: the model's queue past
  its bound, or decode memory in use) that sends its next request before that time has passed, and is
  refused so again, gets the second refusal only once the time it was told has passed (at most
  ``max_hold_s``). A client that resends at once is so paced to what it was asked; one that waits never
  notices, a request that is served is never held, and neither is any other refusal (not ready, shutting
  down, a database away), so health probes poll as fast as they like. Without it, cheap refusals sent
  back to clients that resend at once take the CPU the model needs, and the service serves fewer.
- **HEAD as GET.** FastAPI's routes list only GET where Starlette's also take HEAD: a HEAD request is
  routed as its GET (status and headers, ``Content-Length`` included) and uvicorn, which still sees the
  HEAD, sends no body; monitors and caches probe with HEAD.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
from typing import Any

import anyio
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import HTTP_CODES, PACED, REQUEST_STATE_KEY, error_body, request_id_of
from service.telemetry import ServiceMetrics

log = logging.getLogger("service.access")
_PLAIN_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
REJECT_STATUSES = frozenset({401, 403, 413, 415, 429, 503, 504})


def request_state(scope: Scope) -> dict[str, Any]:
    state = scope.setdefault(REQUEST_STATE_KEY, {})
    assert isinstance(state, dict)
    return state


def note_task(request: Request, task: str) -> None:
    """Record the (canonical) task a request was about, for the log line and the metric label."""
    request_state(request.scope)["task"] = task


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _PLAIN_ID.match(text) else None
    return None


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _client_request_id(scope) or uuid.uuid4().hex
        state = request_state(scope)
        state["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, state, status, time.perf_counter() - start)

    def _record(self, scope: Scope, state: dict[str, Any], status: int, elapsed: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        task = str(state.get("task") or "-")
        self.metrics.request_duration.labels(template, task, str(status)).observe(elapsed)
        if status in REJECT_STATUSES:
            self.metrics.rejects.labels(HTTP_CODES.get(status, str(status))).inc()
        fields = {
            "request_id": state.get("request_id"),
            "method": scope.get("method"),
            "route": template,
            "path": scope.get("path"),
            "status": status,
            "latency_ms": round(elapsed * 1000, 2),
            "task": task,
        }
        log.info("request", extra={"fields": fields})


class BodyTooLarge(Exception):
    """The request body crossed the configured cap."""


async def send_json_error(send: Send, scope: Scope, status: int, error: str, message: str) -> None:
    body = json.dumps(error_body(status, error, message, request_id=request_id_of(scope))).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else -1
    return None


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = 4 * max_bytes if drain_bytes is None else drain_bytes

    def _too_large_message(self) -> str:
        return f"request body exceeds the limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared == -1:
            await send_json_error(send, scope, 400, "bad_request", "invalid Content-Length header")
            return
        if declared is not None and declared > self.max_bytes:
            await send_json_error(send, scope, 413, "payload_too_large", self._too_large_message())
            return

        received = 0
        exceeded = False
        more_body = True
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded, more_body
            if exceeded:
                raise BodyTooLarge(self._too_large_message())
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more_body = bool(message.get("more_body", False))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge(self._too_large_message())
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:
                return  # the application's answer to a truncated body is replaced by the 413
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if exceeded and not response_started:
            await self._drain(receive, more_body, received)
            await send_json_error(send, scope, 413, "payload_too_large", self._too_large_message())

    async def _drain(self, receive: Receive, more_body: bool, received: int) -> None:
        budget = self.drain_bytes
        while more_body and budget > 0:
            message: Any = await receive()
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            more_body = bool(message.get("more_body", False))


class RequestTimeoutMiddleware:
    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            with anyio.fail_after(self.timeout_s):
                await self.app(scope, receive, tracking_send)
        except TimeoutError:
            if started:
                raise
            message = f"request took longer than {self.timeout_s:g} s"
            await send_json_error(send, scope, 504, "timeout", message)


class RetryPacingMiddleware:
    def __init__(self, app: ASGIApp, max_hold_s: float, max_connections: int = 4096) -> None:
        self.app = app
        self.max_hold_s = max_hold_s
        self.max_connections = max_connections  # connections remembered at once (oldest forgotten first)
        self._until: dict[tuple[str, int], float] = {}  # connection -> when its last Retry-After ends

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] != "http" or not client:
            await self.app(scope, receive, send)
            return
        # One TCP connection (a new one gets a new port); behind a trusted proxy that sets X-Forwarded-For,
        # uvicorn gives the client's address with port 0: that client, however many connections it uses.
        key = (str(client[0]), int(client[1]))
        state = request_state(scope)  # made here, so that the error handler marks this very dict

        async def paced_send(message: Message) -> None:
            if message["type"] == "http.response.start" and state.get(PACED):
                retry_after = _retry_after_s(message)
                if retry_after is not None:
                    now = time.monotonic()
                    until = self._until.pop(key, None)
                    if until is not None and until > now:  # back before it was told: wait out the rest
                        await anyio.sleep(min(until - now, self.max_hold_s))
                        now = time.monotonic()
                    self._remember(key, now + retry_after, now)
            await send(message)

        await self.app(scope, receive, paced_send)

    def _remember(self, key: tuple[str, int], until: float, now: float) -> None:
        if len(self._until) >= self.max_connections:
            for old in [k for k, t in self._until.items() if t <= now]:
                del self._until[old]
            while len(self._until) >= self.max_connections:
                del self._until[next(iter(self._until))]  # the longest-remembered first
        self._until[key] = until


def _retry_after_s(message: Message) -> float | None:
    for name, value in message.get("headers", []):
        if name.lower() == b"retry-after":
            try:
                return float(value)
            except ValueError:
                return None  # an HTTP date: not what this service sends
    return None


class HeadAsGetMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}  # a copy: the server's own scope keeps HEAD (no body sent)
        await self.app(scope, receive, send)
