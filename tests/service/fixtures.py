"""Building blocks of the service tests: a tiny trained-shape run, a real gallery on disk, test images,
and a real uvicorn server on a free loopback port (in a thread of the test process)."""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image

from index.build import embed_images
from index.gallery import Gallery
from index.metadata import NewItem, content_hash
from model.data.synthfaces import render_face
from model.network import ModelConfig, create_model
from model.run import METRICS, load_run, save_run, write_json
from service.api.app import create_app
from service.api.server import DrainingServer
from service.settings import Settings

TASKS = ["Smiling", "Eyeglasses", "Black_Hair", "Wearing_Hat"]
IMAGE_SIZE = 32
GALLERY_SEED = 7
GALLERY_SIZE = 24


def make_run(run_dir: Path) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(
        task_names=TASKS, backbone="resnet18", width=8, image_size=IMAGE_SIZE, embedding_dim=16
    )
    model = create_model(config)
    with torch.no_grad():  # untrained modulation is the identity: make the tasks disagree, as trained ones do
        for parameter in model.modulation_parameters():
            parameter.normal_(1.0, 0.6)
    save_run(run_dir, model)
    metrics = {
        "test": {"tasks": {t: {"triplet_accuracy": 0.5 + i / 10, "map": 0.3} for i, t in enumerate(TASKS)}}
    }
    write_json(run_dir / METRICS, metrics)
    return run_dir


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def face(index: int, seed: int = GALLERY_SEED, size: int = 48) -> tuple[bytes, dict[str, int]]:
    image, labels = render_face(seed, index, size)
    return encode(image), {name: labels[name] for name in TASKS}


def make_gallery(run_dir: Path, index_dir: Path, size: int = GALLERY_SIZE) -> Path:
    run = load_run(run_dir)
    gallery = Gallery.create(
        index_dir, tasks=run.task_names, dim=run.embedding_dim, model_hash=run.model_hash
    )
    try:
        items, images = [], []
        for i in range(size):
            data, labels = face(i)
            image = Image.open(io.BytesIO(data)).convert("RGB")
            images.append(image)
            items.append(
                NewItem(f"face-{i}.png", content_hash(data), image.width, image.height, labels, data)
            )
        gallery.add(items, embed_images(run, images))
        gallery.save()
    finally:
        gallery.close()
    return index_dir


def copy_gallery(template: Path, target: Path) -> Path:
    shutil.copytree(template, target)
    (target / "writer.lock").unlink(missing_ok=True)
    return target


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
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=30
    )
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
