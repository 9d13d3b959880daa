"""Outermost ASGI middleware: request id, one structured log line and the latency metric per request.

The request id is the client's ``X-Request-ID`` when it is short and plain, a fresh one otherwise; it is
echoed in the response header and in error bodies. Routes add the task they served with ``note_task``.
Logged: method, route template, path, status, latency, task, request id — never bodies, queries or keys.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import HTTP_CODES, REQUEST_STATE_KEY
from service.metrics import ServiceMetrics

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
