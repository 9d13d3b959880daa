"""ASGI middleware capping the request body while it is read, chunked uploads included.

A declared ``Content-Length`` over the cap is refused before reading anything. Otherwise the bytes of
every ``http.request`` message are counted as the application reads them; the read that crosses the cap
raises ``BodyTooLarge`` inside the application, whatever the application answers is dropped, and the
client gets 413. The rest of the body is read and discarded (up to ``drain_bytes``) so that a client
still writing gets to read the 413 instead of a connection reset.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body, request_id_of


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
