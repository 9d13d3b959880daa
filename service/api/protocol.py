"""The HTTP/1.1 connection protocol: uvicorn's httptools parser with bounded request heads and JSON errors.

uvicorn accepts request heads of any size (a 64 MiB header is buffered whole, and parsing it holds the
event loop for seconds), and answers what it cannot parse with a plain-text ``Invalid HTTP request
received.``. This subclass bounds the head while it arrives and answers every protocol-level refusal with
the API's JSON error shape, then closes the connection:

- a request target (path + query) over ``max_url_bytes`` → 414 ``uri_too_long``;
- more than ``max_headers`` header lines, or header bytes over ``max_header_bytes`` → 431
  ``headers_too_large``; the bytes of a head still being received are counted per read, so a head that
  never ends is refused once it passes the cap (plus one read), not buffered;
- a connection past ``max_connections`` open ones → 503 ``too_many_connections`` with ``Retry-After`` (idle
  and slow connections would otherwise hold file descriptors until the process runs out);
- a connection that sends nothing for uvicorn's keep-alive timeout after it opens is closed, as an idle
  one is after a response (uvicorn alone would keep a silent socket open for ever);
- a request line and headers not complete ``header_timeout_s`` after the request's first byte → 408
  ``request_timeout`` (a head trickled in byte by byte would otherwise hold its connection forever);
- a transfer coding other than ``chunked`` (``Transfer-Encoding: gzip, chunked``) → 501
  ``unsupported_transfer_encoding``, as RFC 9112 asks (the parser would ignore the gzip);
- anything the parser refuses (a malformed ``Content-Length``, ``Content-Length`` together with chunked
  transfer encoding, a TLS hello on the plain port, bad chunk framing) → 400 ``bad_request``; when that
  happens in a body the app is already reading, the app sees the client disconnect and its own answer
  is dropped (the refusal is the one answer on the connection).

``limited_protocol(settings)`` returns the class configured with the settings' limits, for
``uvicorn.Config(http=...)``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.settings import Settings

log = logging.getLogger("service.protocol")

# After a refusal the rest of what the client is still sending is read and dropped (up to this much, for
# this long) so that it gets to read the answer instead of a connection reset.
_DRAIN_BYTES = 8 * 1024 * 1024
_DRAIN_SECONDS = 2.0
# One socket read is at most this much (asyncio's selector transport); a head is allowed to overrun its
# cap by one read before the byte count refuses it, since a read may also carry the start of the body.
_READ_SLACK = 256 * 1024


class _HeadRefused(Exception):
    """Raised inside a parser callback: the parser stops and ``data_received`` answers the refusal."""


def _default(name: str) -> Any:
    return Settings.model_fields[name].default


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    max_url_bytes: int = _default("max_url_bytes")
    max_headers: int = _default("max_headers")
    max_header_bytes: int = _default("max_header_bytes")
    header_timeout_s: float = _default("header_timeout_s")
    max_connections: int = _default("max_connections")
    retry_after_s: int = _default("retry_after_s")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None  # from a request's first byte to its headers' end
        self._in_head = True  # waiting for (the rest of) a request line and headers
        self._head_read = 0  # bytes received while in the head (over-counts by the body's first read)
        self._header_bytes = 0
        self._refusal: tuple[int, str, str] | None = None
        self._draining = False
        self._drained = 0

    # --- counting --------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:  # the server's set, this one included
            message = f"the server holds {self.max_connections} connections, its cap; retry shortly"
            self._refuse_now(503, "too_many_connections", message)
            return
        # A connection that never sends a byte is idle from the start: uvicorn arms its keep-alive timer only
        # after a response, so silent sockets would otherwise stay open and fill the connection cap.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        if self._draining:
            self._drained += len(data)
            if self._drained > _DRAIN_BYTES:
                self.transport.close()
            return
        if self._in_head:
            self._head_read += len(data)
            if self._head_read > self.max_header_bytes + self.max_url_bytes + _READ_SLACK:
                self._refuse_now(431, "headers_too_large", self._headers_message())
                return
        super().data_received(data)

    def on_message_begin(self) -> None:  # the parser saw a request's first byte
        super().on_message_begin()
        self._in_head = True
        self._header_bytes = 0
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.max_url_bytes:
            self._refusal = (
                414,
                "uri_too_long",
                f"the request target (path and query) is over {self.max_url_bytes} bytes; "
                "send large inputs in the body",
            )
            raise _HeadRefused

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_bytes += len(name) + len(value) + 4  # "name: value\r\n"
        if len(self.headers) > self.max_headers or self._header_bytes > self.max_header_bytes:
            self._refusal = (431, "headers_too_large", self._headers_message())
            raise _HeadRefused
        if name.lower() == b"transfer-encoding":
            codings = [c.strip().lower() for c in value.split(b",")]
            if any(c != b"chunked" for c in codings):  # httptools would read "gzip, chunked" as chunked
                self._refusal = (
                    501,
                    "unsupported_transfer_encoding",
                    "only the chunked transfer coding is understood; send the body as it is "
                    "(Content-Length) or chunked",
                )
                raise _HeadRefused

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._in_head = False
        self._head_read = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        # A head trickled in a byte at a time (slowloris) would hold its connection forever: uvicorn's
        # keep-alive timeout only covers idle connections, and the request timeout starts with the app.
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            message = f"the request line and headers did not arrive within {self.header_timeout_s:g} s"
            self._refuse_now(408, "request_timeout", message)

    def _headers_message(self) -> str:
        return (
            f"request headers too large: at most {self.max_headers} headers and "
            f"{self.max_header_bytes} bytes of them"
        )

    # --- answering -------------------------------------------------------------------------------------

    def _refuse_now(self, status: int, error: str, message: str) -> None:
        self._refusal = (status, error, message)
        self.send_400_response(message)

    def send_400_response(self, msg: str) -> None:
        """Every refusal before the app runs: the API's JSON error body, then the connection closes."""
        status, error, message = self._refusal or (
            400,
            "bad_request",
            "invalid HTTP request: the request line, headers or body framing could not be parsed",
        )
        self._refusal = None
        body = json.dumps(
            {"status": status, "error": error, "message": message, "details": None, "request_id": None}
        ).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"retry-after: %d\r\n" % self.retry_after_s if status == 503 else b"",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        log.info("refused", extra={"fields": {"status": status, "error": error}})
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The app is already running this request (the framing failed in its body): the refusal ends
            # the connection, so the app's own answer is dropped (its receive() reports a disconnect),
            # as uvicorn does when a connection is lost; one already under way cannot take a refusal in
            # its middle, so that connection is just closed.
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        self.transport.write(b"".join(head))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer is complete; read and drop what still arrives
            self._draining = True
            self.loop.call_later(_DRAIN_SECONDS, self.transport.close)
        else:
            self.transport.close()


# httptools wraps an exception raised in a callback into HttpParserCallbackError (an HttpParserError),
# which uvicorn's data_received answers with send_400_response: the refusal recorded above is used there.
assert issubclass(httptools.HttpParserCallbackError, httptools.HttpParserError)


def limited_protocol(settings: Settings) -> type[LimitedHttpToolsProtocol]:
    """The protocol class with ``settings``' limits."""
    return type(
        "ConfiguredHttpToolsProtocol",
        (LimitedHttpToolsProtocol,),
        {
            "max_url_bytes": settings.max_url_bytes,
            "max_headers": settings.max_headers,
            "max_header_bytes": settings.max_header_bytes,
            "header_timeout_s": settings.header_timeout_s,
            "max_connections": settings.max_connections,
            "retry_after_s": settings.retry_after_s,
        },
    )
