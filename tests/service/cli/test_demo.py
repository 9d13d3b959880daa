"""``modret demo`` end to end, in subprocesses as a user runs it: a first run trains, indexes and serves
the printed example searches (each ``curl`` works as printed, and its top 5 share the queried attribute
with the example face, as ``example.json`` labels it); a second run reuses the cached model and index and
is ready quickly; a damaged or mismatched cache is rebuilt. The budget is tiny (a few steps, 32-pixel
faces). The shipped demo model is checked against its recorded sha256 and test metrics (never retrained
here: docs/results.md has the ``--retrain`` reproduction)."""

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
from typing import Any

import httpx
import pytest

from model.data import load_dataset
from model.durable import file_sha256
from model.evaluate import evaluate
from model.run import METRICS, WEIGHTS, load_run
from model.train import TrainConfig
from service.cli import demo, demo_cache

pytestmark = pytest.mark.timeout(900)

# The demo command with a training configuration shrunk to seconds (image size, validation triplets).
# SIGINT is a terminal's Ctrl-C here even when the suite runs as a shell's background job (whose children
# inherit SIGINT ignored, and Python then leaves it ignored): the interrupt test sends it.
RUNNER = """
import signal
import sys
signal.signal(signal.SIGINT, signal.default_int_handler)
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


def printed_curls(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if line.strip().startswith("curl ")]


def run_curl(command: str, cwd: Path) -> dict[str, Any]:
    """The printed command's JSON answer: run by curl as printed, or (without curl) the same request."""
    if shutil.which("curl"):
        done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        body: dict[str, Any] = json.loads(done.stdout)
        return body
    path = re.search(r"image=@(\S+)", command)
    assert path is not None
    files = {"image": ("example.png", (cwd / path.group(1)).read_bytes(), "image/png")}
    url = re.search(r"'(http\S+)'", command)
    assert url is not None
    answer: dict[str, Any] = httpx.post(url.group(1), files=files, timeout=60).json()
    return answer


def check_printed_examples(out: str, cwd: Path, data: Path, port: int) -> list[dict[str, Any]]:
    """Run every printed example search; each returns 5 faces sharing the queried attribute's value with
    the example (as example.json labels it), and the two searches give different answers."""
    example = json.loads((data / "example.json").read_text())
    commands = printed_curls(out)
    assert len(commands) == 2, out
    answers = []
    for command, query in zip(commands, example["queries"], strict=True):
        assert f"http://127.0.0.1:{port}/search?task={query['task'].lower()}&k=5" in command
        body = run_curl(command, cwd)
        task, wanted = body["task"], example["labels"][body["task"]]
        assert task == query["task"] and wanted == query["value"]
        got = [str(hit["labels"][task]) for hit in body["results"]]
        assert got == [str(wanted)] * 5, f"{task}: the example has {wanted}, its top 5 have {got}"
        answers.append(body)
    first, second = ([hit["id"] for hit in a["results"]] for a in answers)
    assert first != second and answers[0]["task"] != answers[1]["task"]
    return answers


def test_demo_trains_serves_then_reuses_its_cache(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = DemoProcess(tmp_path, "first", "--data-dir", "data")
    try:
        waited = first.wait_ready()
        out = first.out.read_text()
        assert f"http://127.0.0.1:{first.port}" in out and "Smiling, Mouth_Slightly_Open" in out
        ready = re.search(r"ready in ([0-9.]+) s", out)
        assert ready is not None and float(ready.group(1)) > 0.5 * waited  # counted from process start
        check_printed_examples(out, tmp_path, data, first.port)
        assert "model: training" in first.err.read_text()
        with httpx.Client(base_url=f"http://127.0.0.1:{first.port}", timeout=60) as client:
            listed = {t["name"]: t for t in client.get("/tasks").json()["tasks"]}
        recorded = json.loads((data / "runs" / "demo" / METRICS).read_text())["test"]["tasks"]
        assert all(listed[n]["leakage"] == pytest.approx(recorded[n]["leakage"], abs=1e-9) for n in recorded)
        assert '"service.access"' not in first.err.read_text()  # no access log line per request
    finally:
        first.stop()
    # A signal-initiated graceful stop exits 0 (service/api/server.py).
    assert first.proc.returncode == 0, first.err.read_text()[-2000:]
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
    paths = demo_cache.DemoPaths(data)
    cfg = shrunk_demo_config()
    assert demo_cache.stale_run_reason(paths.run_dir, cfg) is None
    assert not (paths.run_dir / "checkpoint.pt").exists()  # a finished run keeps no checkpoint
    assert "other settings" in (demo_cache.stale_run_reason(paths.run_dir, shrunk_demo_config(steps=3)) or "")
    assert "other settings" in (demo_cache.shipped_run_reason(cfg) or "")  # the tiny budget is not shipped
    run = load_run(paths.run_dir)
    assert demo_cache.stale_index_reason(paths.index_dir, run, "faiss") is None
    assert "milvus" in (demo_cache.stale_index_reason(paths.index_dir, run, "milvus") or "")
    config_file = paths.index_dir / "gallery.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "model_hash": "0" * 64}))
    assert "model" in (demo_cache.stale_index_reason(paths.index_dir, run, "faiss") or "")  # another's

    said: list[str] = []
    demo_cache.prepare_index(paths, run, 120, say=said.append)  # rebuilds, replacing the mismatched index
    assert any("rebuilding" in line for line in said), said
    assert demo_cache.stale_index_reason(paths.index_dir, run, "faiss") is None
    assert not [p for p in paths.index_dir.parent.iterdir() if p.name.startswith(".")]  # no leftovers

    with sqlite3.connect(paths.index_dir / "gallery.sqlite") as db:  # as built before images were kept
        db.execute("UPDATE items SET has_blob = 0")
    assert "image bytes" in (demo_cache.stale_index_reason(paths.index_dir, run, "faiss") or "")


def test_ctrl_c_while_preparing_exits_cleanly(tmp_path: Path) -> None:
    # Interrupted mid-training (a long run, so the signal lands while it trains): exit 0 and say so, so
    # that `make demo` reports no error; the next start rebuilds what was being built.
    demo = DemoProcess(tmp_path, "interrupted", "--data-dir", "data", "--retrain", "--steps", "100000")
    deadline = time.monotonic() + 300
    while "model: training" not in demo.err.read_text():
        assert demo.proc.poll() is None and time.monotonic() < deadline, demo.err.read_text()[-2000:]
        time.sleep(0.1)
    time.sleep(1.0)
    demo.proc.send_signal(signal.SIGINT)
    try:
        code = demo.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        demo.proc.kill()
        raise AssertionError(f"no exit 120 s after SIGINT:\n{demo.err.read_text()[-2000:]}") from None
    assert code == 0, demo.err.read_text()[-2000:]
    assert "interrupted" in demo.err.read_text()


def test_incomplete_run_is_not_reused(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "demo"
    cfg = shrunk_demo_config()
    assert "not found" in (demo_cache.stale_run_reason(run_dir, cfg) or "")
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{not json")
    assert "not a valid run config" in (demo_cache.stale_run_reason(run_dir, cfg) or "")


def test_the_shipped_model_is_the_recorded_one_and_scores_its_recorded_metrics() -> None:
    shipped = demo_cache.SHIPPED_RUN
    record = json.loads((shipped / demo_cache.SHIPPED_RECORD).read_text())
    assert file_sha256(shipped / WEIGHTS) == record["sha256"]  # not a pointer, truncated or swapped file
    size = (shipped / WEIGHTS).stat().st_size
    assert 1_000_000 < size < 3_500_000, size
    cfg = demo.demo_train_config(demo.DEMO_STEPS, demo.DEMO_WIDTH, demo.DEMO_IMAGES, "cpu")
    assert demo_cache.shipped_run_reason(cfg) is None  # the demo's own settings: a fresh clone uses it
    run = load_run(shipped)
    recorded = json.loads((shipped / METRICS).read_text())["test"]
    dataset = load_dataset("synthfaces", image_size=run.preprocess.image_size, num_images=demo.DEMO_IMAGES)
    result = evaluate(run.model, dataset, run.preprocess)  # the weights still give the recorded figures
    for name, metrics in recorded["tasks"].items():
        for metric in ("triplet_accuracy", "map", "precision_at_10", "leakage"):
            assert result["tasks"][name][metric] == pytest.approx(metrics[metric], abs=0.005), (name, metric)
    assert recorded["mean"]["leakage"] <= 0.10


def test_banner_and_url() -> None:
    assert demo.public_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert demo.public_url("::", 8000) == "http://[::1]:8000"
    assert demo.public_url("10.0.0.5", 81) == "http://10.0.0.5:81"
    queries = [("Smiling", 1), ("Eyeglasses", 0)]
    text = demo.banner(
        "http://127.0.0.1:8000", ["Smiling", "Bald"], Path("/x/example.png"), queries, 7, True, 1.5
    )
    assert 'curl -s -H "X-API-Key: $MODRET_API_KEY" -F image=@/x/example.png' in text
    assert "'http://127.0.0.1:8000/search?task=smiling&k=5'" in text
    assert "'http://127.0.0.1:8000/search?task=eyeglasses&k=5'" in text
    assert "Smiling = 1" in text and "Eyeglasses = 0" in text and "/x/example.json" in text
    refused = demo.banner("http://127.0.0.1:8000", ["Smiling"], Path("/x/example.png"), [], 7, False, 1.5)
    assert "curl" not in refused and "no example search printed" in refused
