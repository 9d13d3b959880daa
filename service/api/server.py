"""Running the app under uvicorn: ``build_server(settings)`` and the draining server it returns.

SIGTERM/SIGINT: readiness turns 503 at once; after ``drain_delay_s`` (time for a load balancer to notice)
uvicorn stops accepting, lets in-flight requests finish, and the app's lifespan saves the gallery. A stop
asked for by a signal is a clean stop: the process then exits 0 (uvicorn would re-raise the signal, so
that Ctrl-C ends ``modret serve`` with status 130 and ``make demo`` with ``make: *** Error 130``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn

from service.api.app import create_app
from service.api.deps import ServiceState
from service.api.protocol import limited_protocol
from service.logs import configure_logging
from service.settings import Settings

log = logging.getLogger("service.serve")


class StartupFailed(Exception):
    """The server did not start: the run or gallery cannot be served (the message says why)."""


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose exit signal first marks the app not-ready, then exits after a delay."""

    def __init__(self, config: uvicorn.Config, state: ServiceState, drain_delay_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_delay_s = drain_delay_s

        self._loop: asyncio.AbstractEventLoop | None = None
        self.stop_signals: list[int] = []  # the signals that stopped the server

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's run; ``StartupFailed`` instead of uvicorn's ``sys.exit(3)`` when the lifespan could
        not load the run or gallery, for the caller to report in one line."""
        try:
            super().run(sockets)
        except SystemExit:
            if self.state.startup_error is not None:
                raise StartupFailed(self.state.startup_error) from None
            raise

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's signal capture, without re-raising the signal once the graceful stop is done: the
        stop was asked for and has finished, so the command returns normally (exit status 0)."""
        with super().capture_signals():
            try:
                yield
            finally:
                self.stop_signals = list(self._captured_signals)
                self._captured_signals.clear()  # what uvicorn re-raises on leaving its context

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler (runs on the loop's thread): not ready now, stop after the drain delay."""
        first = not self.state.draining
        self.state.draining = True
        if first and self.drain_delay_s > 0 and self._loop is not None:
            log.info("draining", extra={"fields": {"delay_s": self.drain_delay_s}})
            self._loop.call_later(self.drain_delay_s, super().handle_exit, sig, frame)
            return
        super().handle_exit(sig, frame)

    def request_exit(self) -> None:
        """What SIGTERM does, callable from any thread."""
        if self._loop is None:
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self.handle_exit, signal.SIGTERM, None)


def server_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration for ``app``: our access log instead of uvicorn's, bounded request heads
    with JSON refusals (``service.api.protocol``), a graceful-shutdown window past the request timeout."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "http": limited_protocol(settings),
        "timeout_graceful_shutdown": max(5, int(settings.request_timeout_s) + 5),
        "server_header": False,
        # No route is a WebSocket: an upgrade request is answered as the plain HTTP request it also is
        # (JSON, or the route's 404), not with the websockets library's bare 403.
        "ws": "none",
        **overrides,
    }
    return uvicorn.Config(app, **options)


def build_server(settings: Settings) -> DrainingServer:
    """The app for ``settings`` under a draining uvicorn server (logging configured first)."""
    configure_logging(settings.log_level)
    app = create_app(settings)
    return DrainingServer(server_config(app, settings), app.state.modret, settings.drain_delay_s)
