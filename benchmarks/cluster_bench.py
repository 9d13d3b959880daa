"""Replicas over PostgreSQL and a Milvus server (issue 14): searches/s and p50/p99 latency with one and with
two ``modret serve`` replicas over the same engines.

    .venv/bin/python benchmarks/cluster_bench.py --gallery 5000 --seconds 10 --concurrency 4 --json c.json

Starts a real PostgreSQL (``tests.postgres_server``, Debian's binaries) and a real Milvus 2.3.5 standalone
(``tests.milvus_server``, the ``milvus`` wheel's binary) in temporary directories, fills one shared gallery
of the tests' tiny run (``tests.factories.make_run``: 4 tasks, 32-d) with ``--gallery`` items (random unit
vectors under every task, a binary label ``Smiling`` each; written through ``SharedGallery.insert``, the
replicas' write protocol), then starts replica A (``MODRET_METADATA_URL`` + ``MODRET_MILVUS_URI``) and
measures ``--concurrency`` client threads posting a 48-px face to ``POST /search?task=…&k=10`` for
``--seconds`` (plain, then with ``filter=Smiling:1``, which Milvus evaluates on its labels field); then
starts replica B and measures again with the clients spread over A and B (what a round-robin balancer
does). Latency is per request at the client; throughput is 200s per second of wall time.

On a machine with few cores (the VM this is recorded on has two, shared by the client threads, both
replicas, PostgreSQL and Milvus) a second replica mostly shows that two processes serve one gallery
correctly, not that it doubles throughput: they compete for the same cores. The output says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from report import json_out, write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from index.metadata import NewItem, content_hash  # noqa: E402
from index.shared_gallery import SharedGallery  # noqa: E402
from model.run import load_run  # noqa: E402
from tests.factories import face, make_run  # noqa: E402
from tests.milvus_server import start as start_milvus  # noqa: E402
from tests.postgres_server import PostgresServer  # noqa: E402
from tests.processes import free_port  # noqa: E402

NOTE = (
    "two replicas on this machine share its CPU cores with each other, the clients, PostgreSQL and Milvus: "
    "the second replica shows correctness (one gallery served by two processes) more than speed"
)


def fill(url: str, milvus_uri: str, run_dir: Path, n: int) -> float:
    run = load_run(run_dir)
    gallery = SharedGallery.open(
        url, milvus_uri=milvus_uri, create=True, tasks=run.task_names, dim=run.embedding_dim,
        model_hash=run.model_hash, fingerprints=run.fingerprints, repair_every_s=None,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    try:
        for start in range(0, n, 500):
            count = min(500, n - start)
            items = []
            for i in range(start, start + count):
                digest = content_hash(f"bench item {i}".encode())
                items.append(NewItem(f"item-{i}.png", digest, 48, 48, {"Smiling": int(i % 2)}))
            vectors = rng.standard_normal((count, len(run.task_names), run.embedding_dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
            gallery.insert(items, vectors)
    finally:
        gallery.close()
    return time.perf_counter() - started


def start_replica(
    env: dict[str, str], run_dir: Path, root: Path, name: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    modret = Path(sys.executable).with_name("modret")
    log = (root / f"replica-{name}.log").open("ab")
    process = subprocess.Popen(
        [str(modret), "serve", "--run", str(run_dir), "--index", str(root / name), "--port", str(port),
         "--device", "cpu"],
        env=env, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"replica {name} exited: {(root / f'replica-{name}.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"replica {name} not ready")


def measure(
    urls: list[str], task: str, seconds: float, concurrency: int, filter: str | None
) -> dict[str, Any]:
    images = [face(i)[0] for i in range(16)]
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    params: dict[str, Any] = {"task": task, "k": 10}
    if filter:
        params["filter"] = filter

    def client(w: int) -> None:
        nonlocal errors
        with httpx.Client(base_url=urls[w % len(urls)], timeout=60) as http:
            i = w
            while time.perf_counter() < deadline:
                i += concurrency
                began = time.perf_counter()
                try:
                    response = http.post(
                        "/search",
                        params=params,
                        files={"image": ("q.png", images[i % len(images)], "image/png")},
                    )
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - began)
                    else:
                        errors += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "replicas": len(urls),
        "filter": filter,
        "concurrency": concurrency,
        "searches": len(latencies),
        "errors": errors,
        "searches_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 1) if ordered else None,
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 1)
        if ordered
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", type=json_out)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modret-cluster-bench-"))
    postgres = PostgresServer.start()
    milvus = start_milvus(work / "milvus")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        run_dir = make_run(work / "run")
        url = postgres.create_database() + "?schema=bench"
        fill_s = fill(url, milvus.uri, run_dir, args.gallery)
        task = load_run(run_dir).task_names[0]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MODRET_")},
            "MODRET_METADATA_URL": url,
            "MODRET_MILVUS_URI": milvus.uri,
            "MODRET_LOG_LEVEL": "WARNING",
        }
        rows = []
        a, a_url = start_replica(env, run_dir, work, "a")
        processes.append(a)
        for filter in (None, "Smiling:1"):
            rows.append(measure([a_url], task, args.seconds, args.concurrency, filter))
        b, b_url = start_replica(env, run_dir, work, "b")
        processes.append(b)
        for filter in (None, "Smiling:1"):
            rows.append(measure([a_url, b_url], task, args.seconds, args.concurrency, filter))
        result = {
            "gallery": args.gallery,
            "fill_s": round(fill_s, 1),
            "milvus_start_s": round(milvus.start_s, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "note": NOTE,
            "rows": rows,
        }
        print(
            f"gallery {args.gallery} items (filled in {fill_s:.1f} s), {args.concurrency} clients, "
            f"{args.seconds:g} s each"
        )
        print(f"{'replicas':>8} {'filter':>10} {'searches/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        for row in rows:
            print(
                f"{row['replicas']:>8} {row['filter'] or '-':>10} {row['searches_per_s']:>11} "
                f"{row['p50_ms']:>8} {row['p99_ms']:>8} {row['errors']:>6}"
            )
        print(f"note: {NOTE}")
        if args.json:
            write_json(args.json, result)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
        milvus.stop()
        postgres.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
