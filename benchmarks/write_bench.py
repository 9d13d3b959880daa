"""Gallery writes: single-image ``POST /images`` latency and rate by gallery size, reads beside writes, and
a crash loop (issue 13).

    .venv/bin/python benchmarks/write_bench.py --sizes 1000 100000 --json writes.json
    .venv/bin/python benchmarks/write_bench.py --crash-kills 120 --json crash.json

Write mode: for each size, a gallery of a demo-shaped model (untrained: ResNet-18 width 16, 64 px, 128-d,
the 12 SynthFaces tasks) is filled directly with that many random unit vectors per task (no images: the
add path does not depend on them) and snapshotted; ``modret serve`` then runs in a subprocess on a free
loopback port and one client posts ``--adds`` distinct 64-px PNG faces, one image per request, one after
the other (embedding included). Then, for ``--mixed-seconds``, two clients add, one deletes what was
added and one searches (``k=10``): the search and delete latencies show whether reads and deletes wait
for writes or snapshots. The server snapshots every ``--snapshot-every-s`` seconds, so snapshots happen
during the measurement. ``--json PATH`` writes a list of objects with ``gallery_size``, ``add_p50_ms``,
``add_p99_ms``, ``adds_per_s``, ``mixed_search_p50_ms``, ``mixed_search_p99_ms``, ``mixed_delete_p50_ms``,
``mixed_adds_per_s``, ``fill_s``, ``snapshots``.

Crash mode: a child process (forked) opens a gallery and writes forever — adds of 1-3 items, removes of
acknowledged ids, background snapshots every 15 records or 0.2 s — reporting each write before it starts
and after it returned; the parent SIGKILLs it at a random moment (0-0.4 s after it is ready), reopens the
gallery and checks: every acknowledged add present with its vectors, every acknowledged remove gone, no
item that no write ever began, ``verify`` clean. ``--json`` writes the counts.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from report import json_out, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.gallery import Gallery
from index.metadata import NewItem, content_hash

FILL_CHUNK = 10_000


def machine() -> str:
    import torch

    return f"{os.cpu_count()}-core {platform.machine()}, torch {torch.__version__}"


def unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def build(root: Path, size: int) -> tuple[Path, Path, float]:
    """A demo-shaped run and a gallery of ``size`` random items; returns (run, index, fill seconds)."""
    import torch

    from model.data.synthfaces import DEFAULT_TASKS
    from model.network import ModelConfig, create_model
    from model.run import load_run, save_run

    torch.manual_seed(0)
    config = ModelConfig(task_names=list(DEFAULT_TASKS), width=16, image_size=64, embedding_dim=128)
    save_run(root / "run", create_model(config))
    run = load_run(root / "run")
    started = time.perf_counter()
    gallery = Gallery.create(
        root / "index", tasks=run.task_names, dim=run.embedding_dim, model_hash=run.model_hash
    )
    rng = np.random.default_rng(0)
    for start in range(0, size, FILL_CHUNK):
        n = min(FILL_CHUNK, size - start)
        items = [
            NewItem(f"random-{i}", content_hash(f"random {i}".encode()), 64, 64, {})
            for i in range(start, start + n)
        ]
        gallery.add(items, unit(rng, (n, len(run.task_names), run.embedding_dim)))
    gallery.save()
    gallery.close()
    return root / "run", root / "index", time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def png(index: int) -> bytes:
    from model.data.synthfaces import render_face

    buffer = io.BytesIO()
    render_face(4242, index, 64)[0].save(buffer, "PNG")
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def measure(size: int, adds: int, mixed_seconds: float, snapshot_every_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="write-bench-") as tmp:
        run, index, fill_s = build(Path(tmp), size)
        print(f"gallery of {size}: filled and snapshotted in {fill_s:.1f} s", flush=True)
        port = free_port()
        env = {**os.environ, "MODRET_SNAPSHOT_EVERY_S": str(snapshot_every_s), "MODRET_LOG_LEVEL": "WARNING"}
        modret = Path(sys.executable).with_name("modret")
        command = [str(modret), "serve", "--run", str(run), "--index", str(index), "--port", str(port)]
        server = subprocess.Popen([*command, "--device", "cpu"], env=env, stdout=subprocess.DEVNULL)
        images = [png(i) for i in range(adds + 2000)]
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if client.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("modret serve did not become ready")
                time.sleep(0.1)
            for i in range(5):  # warm-up adds (first requests pay one-time costs)
                client.post("/images", files={"images": (f"w{i}.png", images[-1 - i], "image/png")})
            latencies: list[float] = []
            added: list[int] = []
            started = time.perf_counter()
            for i in range(adds):
                t0 = time.perf_counter()
                response = client.post("/images", files={"images": (f"{i}.png", images[i], "image/png")})
                latencies.append((time.perf_counter() - t0) * 1000)
                assert response.status_code == 201, response.text
                added.append(int(response.json()["items"][0]["id"]))
            single = time.perf_counter() - started
            mixed = mixed_load(port, images[adds:-10], added, mixed_seconds)
            generation = client.get("/v2/health/ready").json().get("index_generation")
        finally:
            client.close()
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=300)
    row = {
        "gallery_size": size,
        "add_p50_ms": round(statistics.median(latencies), 2),
        "add_p99_ms": round(percentile(latencies, 99), 2),
        "adds_per_s": round(adds / single, 2),
        **mixed,
        "fill_s": round(fill_s, 1),
        "generation_at_end": generation,
    }
    print(json.dumps(row), flush=True)
    return row


def mixed_load(port: int, images: list[bytes], added: list[int], seconds: float) -> dict[str, Any]:
    """Two adding clients, one deleting, one searching, for ``seconds``."""
    stop = threading.Event()
    searches: list[float] = []
    deletes: list[float] = []
    adds: list[float] = []
    pool = list(images)
    lock = threading.Lock()

    def adder() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            while not stop.is_set():
                with lock:
                    if not pool:
                        return
                    data = pool.pop()
                t0 = time.perf_counter()
                response = client.post("/images", files={"images": ("m.png", data, "image/png")})
                adds.append((time.perf_counter() - t0) * 1000)
                with lock:
                    added.append(int(response.json()["items"][0]["id"]))

    def deleter() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            while not stop.is_set():
                with lock:
                    victim = added.pop(0) if added else None
                if victim is None:
                    time.sleep(0.01)
                    continue
                t0 = time.perf_counter()
                client.delete(f"/images/{victim}")
                deletes.append((time.perf_counter() - t0) * 1000)
                time.sleep(0.05)

    def searcher() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            query = images[0]
            while not stop.is_set():
                t0 = time.perf_counter()
                client.post(
                    "/search",
                    params={"task": "Smiling", "k": 10},
                    files={"image": ("q.png", query, "image/png")},
                )
                searches.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=f) for f in (adder, adder, deleter, searcher)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    elapsed = time.perf_counter() - started
    return {
        "mixed_search_p50_ms": round(percentile(searches, 50), 2),
        "mixed_search_p99_ms": round(percentile(searches, 99), 2),
        "mixed_delete_p50_ms": round(percentile(deletes, 50), 2),
        "mixed_delete_p99_ms": round(percentile(deletes, 99), 2),
        "mixed_add_p50_ms": round(percentile(adds, 50), 2),
        "mixed_adds_per_s": round(len(adds) / elapsed, 2),
    }


# --- crash loop ------------------------------------------------------------------------------------------

TASKS = ["A", "B", "C"]
DIM = 16
HASH = "c" * 64


def crash_item(n: int) -> NewItem:
    return NewItem(f"i{n}", content_hash(f"crash {n}".encode()), 8, 8, {"Male": n % 2})


def crash_vectors(n: int) -> np.ndarray:
    return unit(np.random.default_rng(n), (1, len(TASKS), DIM))


def child(root: str, first: int, conn: Connection) -> None:
    gallery = Gallery.open(Path(root), model_hash=HASH, snapshot_every_records=15, snapshot_every_s=0.2)
    rng = random.Random(first)
    acked: list[int] = []
    n = first
    conn.send(("ready", 0))
    while True:
        if acked and rng.random() < 0.3:
            victim = acked.pop(rng.randrange(len(acked)))
            conn.send(("removing", victim))
            gallery.remove([victim])
            conn.send(("removed", victim))
        else:
            count = rng.randint(1, 3)
            numbers = list(range(n, n + count))
            n += count
            conn.send(("adding", numbers))
            ids = gallery.add(
                [crash_item(k) for k in numbers], np.concatenate([crash_vectors(k) for k in numbers])
            )
            acked += ids
            conn.send(("added", list(zip(numbers, ids, strict=True))))


def crash_loop(kills: int) -> dict[str, Any]:
    context = mp.get_context("fork")
    chooser = random.Random(2024)
    counts = {"kills": kills, "acknowledged_adds": 0, "acknowledged_removes": 0, "lost_adds": 0,
              "resurrected_removes": 0, "unverifiable": 0, "never_begun_visible": 0, "torn_tails_dropped": 0,
              "in_flight_writes_kept": 0, "snapshots_seen": 0}  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crash-loop-") as tmp:
        root = Path(tmp) / "gallery"
        Gallery.create(root, tasks=TASKS, dim=DIM, model_hash=HASH).close()
        live: dict[int, int] = {}  # id -> item number, acknowledged and not removed
        removed: set[int] = set()
        begun: set[int] = set()
        next_number = 0
        generations: set[int] = set()
        for _ in range(kills):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=child, args=(str(root), next_number, send))
            process.start()
            send.close()
            assert receive.poll(30) and receive.recv()[0] == "ready"
            time.sleep(chooser.uniform(0, 0.4))
            os.kill(process.pid, signal.SIGKILL)  # type: ignore[arg-type]
            process.join()
            in_flight: list[int] = []
            removing: int | None = None
            while True:
                try:
                    kind, value = receive.recv()
                except EOFError:
                    break
                if kind == "adding":
                    begun.update(value)
                    in_flight = value
                    next_number = max(next_number, max(value) + 1)
                elif kind == "added":
                    live.update({item_id: number for number, item_id in value})
                    counts["acknowledged_adds"] += len(value)
                    in_flight = []
                elif kind == "removing":
                    removing = value
                elif kind == "removed":
                    removing = None
                    live.pop(value, None)
                    removed.add(value)
                    counts["acknowledged_removes"] += 1
            receive.close()
            try:
                gallery = Gallery.open(root, model_hash=HASH)
            except Exception as e:  # counted: a gallery that does not open is unverifiable
                print(f"unverifiable after a kill: {e}", flush=True)
                counts["unverifiable"] += 1
                break
            try:
                counts["torn_tails_dropped"] += sum(
                    "dropped an incomplete record" in r for r in gallery.repairs
                )
                if not gallery.verify(HASH).ok:
                    counts["unverifiable"] += 1
                present = set(gallery.metadata.ids().tolist())
                if removing is not None and removing not in present:  # an in-flight remove that committed
                    live.pop(removing, None)
                    counts["in_flight_writes_kept"] += 1
                counts["lost_adds"] += len(set(live) - present)
                counts["resurrected_removes"] += len(removed & present)
                sources = {r.source for r in gallery.items(sorted(present)).values()}
                numbers = {int(s[1:]) for s in sources}
                counts["never_begun_visible"] += len(numbers - begun)
                kept = [k for k in in_flight if k in numbers]
                counts["in_flight_writes_kept"] += len(kept)
                for record in gallery.items(
                    sorted(present)
                ).values():  # in-flight adds that made it count as live
                    number = int(record.source[1:])
                    if number in kept:
                        live[record.id] = number
                for item_id in list(live)[:20]:
                    np.testing.assert_allclose(
                        gallery.vectors([item_id], "B"), crash_vectors(live[item_id])[:, 1], atol=1e-6
                    )
                live = {i: n for i, n in live.items() if i in present}
                removed -= present
                if gallery.store.manifest is not None:
                    generations.add(gallery.store.manifest.generation)
            finally:
                gallery.close(snapshot=False)
        counts["snapshots_seen"] = len(generations)
    counts["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(counts), flush=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 100_000])
    parser.add_argument("--adds", type=int, default=200, help="single-image adds per size")
    parser.add_argument("--mixed-seconds", type=float, default=15.0)
    parser.add_argument("--snapshot-every-s", type=float, default=5.0)
    parser.add_argument("--crash-kills", type=int, default=0, help="run the crash loop instead")
    parser.add_argument("--json", type=json_out)
    args = parser.parse_args()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    result: Any
    if args.crash_kills:
        result = {**crash_loop(args.crash_kills), "machine": machine(), "command": command}
    else:
        result = [
            {**measure(size, args.adds, args.mixed_seconds, args.snapshot_every_s), "machine": machine()}
            for size in args.sizes
        ]
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
