"""``modret demo`` end to end, in subprocesses as a user runs it: a first run trains, indexes and serves a
search (the printed ``curl`` works as printed); a second run reuses the cached model and index and is ready
quickly; a damaged or mismatched cache is rebuilt. The budget is tiny (a few steps, 32-pixel faces)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from model.run import WEIGHTS, load_run
from model.train import TrainConfig
from service.cli import demo

pytestmark = pytest.mark.timeout(900)

# The demo command with a training configuration shrunk to seconds (image size, validation triplets).
RUNNER = """
import sys
import service.cli.demo as demo

full = demo.demo_train_config

def tiny(steps, width, num_images, device="auto"):
    cfg = full(steps, width, num_images, device)
    cfg.image_size, cfg.per_task, cfg.val_triplets_per_task = 32, 2, 8
    return cfg

demo.demo_train_config = tiny
from service.cli import app
app(sys.argv[1:], prog_name="modret")
"""
BUDGET = ["--steps", "2", "--width", "8", "--num-images", "120", "--device", "cpu"]
READY = "modret demo ready"


def shrunk_demo_config(steps: int = 2) -> TrainConfig:
    """The demo's own training configuration, shrunk as ``RUNNER`` shrinks it (its cache keys on it)."""
    cfg = demo.demo_train_config(steps, 8, 120, "cpu")
    cfg.image_size, cfg.per_task, cfg.val_triplets_per_task = 32, 2, 8
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DemoProcess:
    def __init__(self, cwd: Path, name: str, *args: str) -> None:
        self.port = free_port()
        self.out, self.err = cwd / f"{name}.out", cwd / f"{name}.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODRET_")}
        self.started = time.perf_counter()
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", RUNNER, "demo", "--port", str(self.port), *BUDGET, *args],
                cwd=cwd, env=env, stdout=out, stderr=err,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 600) -> float:
        deadline = time.monotonic() + timeout
        while READY not in self.out.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"demo never got ready:\n{self.out.read_text()}\n{self.err.read_text()[-4000:]}"
                )
            time.sleep(0.1)
        return time.perf_counter() - self.started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def search_with_printed_curl(out: str, cwd: Path, port: int) -> dict[str, object]:
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("curl "))
    assert f"http://127.0.0.1:{port}/search?task=smiling" in command
    if shutil.which("curl"):
        done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        body: dict[str, object] = json.loads(done.stdout)
        return body
    path = re.search(r"image=@(\S+)", command)
    assert path is not None
    files = {"image": ("example.png", (cwd / path.group(1)).read_bytes(), "image/png")}
    url = re.search(r"'(http\S+)'", command)
    assert url is not None
    answer: dict[str, object] = httpx.post(url.group(1), files=files, timeout=60).json()
    return answer


def test_demo_trains_serves_then_reuses_its_cache(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = DemoProcess(tmp_path, "first", "--data-dir", "data")
    try:
        first.wait_ready()
        out = first.out.read_text()
        assert f"http://127.0.0.1:{first.port}" in out and "Smiling, Mouth_Slightly_Open" in out
        body = search_with_printed_curl(out, tmp_path, first.port)
        results = body["results"]
        assert body["task"] == "Smiling" and isinstance(results, list) and len(results) == 5
        assert "model: training" in first.err.read_text()
    finally:
        first.stop()
    # uvicorn re-raises the signal after its graceful shutdown: a clean stop ends "killed by SIGTERM"
    assert first.proc.returncode in (0, -signal.SIGTERM), first.err.read_text()[-2000:]
    assert "Application shutdown complete" in first.err.read_text()
    weights_mtime = (data / "runs" / "demo" / WEIGHTS).stat().st_mtime_ns

    second = DemoProcess(tmp_path, "second", "--data-dir", str(data))
    try:
        seconds = second.wait_ready(timeout=120)
        err = second.err.read_text()
        assert "model: reusing" in err and "index: reusing" in err, err[-2000:]
        assert "training" not in err
        assert seconds < 60, f"a cached start took {seconds:.1f} s"
        with httpx.Client(base_url=f"http://127.0.0.1:{second.port}", timeout=60) as client:
            assert client.get("/v2/health/ready").json()["gallery_size"] == 120
    finally:
        second.stop()
    assert (data / "runs" / "demo" / WEIGHTS).stat().st_mtime_ns == weights_mtime
    print(f"cached demo start: ready {seconds:.1f} s after launch")

    # What invalidates the cache.
    paths = demo.DemoPaths(data)
    cfg = shrunk_demo_config()
    assert demo.stale_run_reason(paths.run_dir, cfg) is None
    assert "other settings" in (demo.stale_run_reason(paths.run_dir, shrunk_demo_config(steps=3)) or "")
    run = load_run(paths.run_dir)
    assert demo.stale_index_reason(paths.index_dir, run, "faiss") is None
    assert "milvus" in (demo.stale_index_reason(paths.index_dir, run, "milvus") or "")
    config_file = paths.index_dir / "gallery.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "model_hash": "0" * 64}))
    assert "model" in (demo.stale_index_reason(paths.index_dir, run, "faiss") or "")  # built with another

    said: list[str] = []
    demo.prepare_index(paths, run, 120, say=said.append)  # rebuilds, replacing the mismatched index
    assert any("rebuilding" in line for line in said), said
    assert demo.stale_index_reason(paths.index_dir, run, "faiss") is None
    assert not [p for p in paths.index_dir.parent.iterdir() if p.name.startswith(".")]  # no leftovers

    with sqlite3.connect(paths.index_dir / "gallery.sqlite") as db:  # as built before images were kept
        db.execute("UPDATE items SET has_blob = 0")
    assert "image bytes" in (demo.stale_index_reason(paths.index_dir, run, "faiss") or "")


def test_incomplete_run_is_not_reused(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "demo"
    cfg = shrunk_demo_config()
    assert "not found" in (demo.stale_run_reason(run_dir, cfg) or "")
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{not json")
    assert "not a valid run config" in (demo.stale_run_reason(run_dir, cfg) or "")


def test_banner_and_url() -> None:
    assert demo.public_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert demo.public_url("::", 8000) == "http://[::1]:8000"
    assert demo.public_url("10.0.0.5", 81) == "http://10.0.0.5:81"
    text = demo.banner("http://127.0.0.1:8000", ["Smiling", "Bald"], Path("/x/example.png"), 7, True, 1.5)
    assert 'curl -s -H "X-API-Key: $MODRET_API_KEY" -F image=@/x/example.png' in text
    assert "'http://127.0.0.1:8000/search?task=smiling&k=5'" in text
