"""``modret serve``: run the API with uvicorn (registered by ``service/cli.py``).

SIGTERM/SIGINT: readiness turns 503 at once; after ``drain_delay_s`` (time for a load balancer to notice)
uvicorn stops accepting, lets in-flight requests finish, and the app's lifespan saves the gallery.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
import uvicorn

from service.app import configure, create_app
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("service.serve")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose exit signal first marks the app not-ready, then exits after a delay."""

    def __init__(self, config: uvicorn.Config, state: ServiceState, drain_delay_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_delay_s = drain_delay_s

        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

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


def build_server(settings: Settings) -> DrainingServer:
    """The app for ``settings`` under a draining uvicorn server (logging configured first)."""
    configure(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(5, int(settings.request_timeout_s) + 5),
        server_header=False,
    )
    return DrainingServer(config, app.state.modret, settings.drain_delay_s)


def serve(
    run: Annotated[Path, typer.Option(help="run directory written by `modret train`")],
    index: Annotated[Path, typer.Option(help="gallery directory written by `modret index build`")],
    host: Annotated[str, typer.Option(help="bind address (loopback by default)")] = "127.0.0.1",
    port: int = 8000,
    max_batch_size: Annotated[int | None, typer.Option(help="images per model call; 1: no batching")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="wait to fill a batch")] = None,
    create_index: Annotated[bool | None, typer.Option(help="create an empty gallery if none")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | auto")] = None,
) -> None:
    """Serve RUN's model over the gallery in INDEX on HOST:PORT. Every other setting comes from
    ``MODRET_*`` environment variables or ``.env`` (see ``service.settings.Settings``)."""
    overrides: dict[str, Any] = {"run_dir": run, "index_dir": index, "host": host, "port": port}
    for name, value in (
        ("max_batch_size", max_batch_size),
        ("max_wait_ms", max_wait_ms),
        ("create_index", create_index),
        ("device", device),
    ):
        if value is not None:
            overrides[name] = value
    build_server(Settings(**overrides)).run()
