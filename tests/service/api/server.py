"""The API tests' server: ``create_app(settings)`` under a real uvicorn server on a free loopback port (in a
thread of the test process), ``settings_for`` a run and a gallery, and ``error_of`` for the JSON error
body. The run, the gallery and test images come from ``tests.factories``."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from service.api.app import create_app
from service.api.server import DrainingServer, server_config
from service.settings import Settings


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Server:
    url: str
    app: FastAPI
    server: DrainingServer
    thread: threading.Thread

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@contextmanager
def running_server(settings: Settings) -> Iterator[Server]:
    """create_app(settings) served by uvicorn on a free 127.0.0.1 port; stopped (gracefully) after."""
    app = create_app(settings)
    sock = free_socket()
    port = sock.getsockname()[1]
    # The production configuration (bounded heads, JSON protocol errors), on the test's own socket.
    config = server_config(app, settings, lifespan="on", timeout_graceful_shutdown=30)
    server = DrainingServer(config, app.state.modret, settings.drain_delay_s)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not the main thread
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    running = Server(f"http://127.0.0.1:{port}", app, server, thread)
    try:
        yield running
    finally:
        running.stop()
        sock.close()


def settings_for(run_dir: Path, index_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"run_dir": run_dir, "index_dir": index_dir, "max_wait_ms": 2.0, **overrides}
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The JSON error body, checked to have the service's error shape."""
    assert response.headers["content-type"].startswith("application/json"), response.text[:200]
    body: dict[str, Any] = json.loads(response.content)
    assert body["status"] == response.status_code
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    return body
