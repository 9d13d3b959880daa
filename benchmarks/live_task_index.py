"""Indexing a new task on a live service: how long ``POST /admin/tasks/{task}/index`` takes, and what
searches see meanwhile.

    .venv/bin/python benchmarks/live_task_index.py                      # 4,000-image gallery, defaults
    .venv/bin/python benchmarks/live_task_index.py --gallery 10000 --json live.json

A temporary untrained model of the demo's shape (as ``benchmarks/load.py``: latency does not depend on
the weights) indexes a SynthFaces gallery with its images stored; a child run appends one task (fresh
rows, what ``modret task add`` writes; its old tasks embed bit for bit as the parent's). The real server
(``modret serve``'s, in its own process) serves the child over the gallery. Then: searches at
``--concurrency`` for ``--seconds`` (before), ``POST /admin/tasks/{task}/index`` with searches going on
until the job is done (during), and uploads during the job too; printed: the job's wall time, images
embedded per second, search p50/p99 before and during, uploads accepted during, and the new task's
gallery size after.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from report import json_out, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/load.py (it adds the repository)

from load import Connection, build_fixture, free_port, search_requests, wait_ready

ADMIN = {"X-API-Key": "bench-admin"}
NEW_TASK = "Added"


def serve(run: str, index: str, port: int) -> None:
    from service.api.server import build_server
    from service.settings import Settings

    settings = Settings(
        run_dir=Path(run), index_dir=Path(index), device="cpu", log_level="WARNING", host="127.0.0.1",
        port=port, admin_key="bench-admin",
    )  # fmt: skip
    build_server(settings).run()


def child_run(parent: Path, out: Path) -> Path:
    from model.run import load_run, save_run
    from model.tasks import append_tasks, new_task

    run = load_run(parent)
    child = append_tasks(run.model, new_task(run.model, NEW_TASK, seed=1))
    save_run(out, child, extra={"lineage": [{"operation": "add_task", "task": NEW_TASK,
                                             "parent_model_hash": run.model_hash}]})  # fmt: skip
    return out


async def searches(url: str, requests: list[bytes], concurrency: int, until: asyncio.Event) -> list[float]:
    latencies: list[float] = []
    connections = [await Connection.open(url) for _ in range(concurrency)]

    async def worker(connection: Connection, offset: int) -> None:
        i = offset
        while not until.is_set():
            started = time.perf_counter()
            status = await connection.send(requests[i % len(requests)])
            if status == 200:
                latencies.append(time.perf_counter() - started)
            i += concurrency

    try:
        await asyncio.gather(*(worker(c, i) for i, c in enumerate(connections)))
    finally:
        for connection in connections:
            connection.close()
    return latencies


def _ms(latencies: list[float], q: float) -> float | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    return 1000 * (
        statistics.median(ordered) if q == 0.5 else ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    )


async def bench(
    url: str, requests: list[bytes], uploads: list[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    stop = asyncio.Event()
    before_task = asyncio.create_task(searches(url, requests, args.concurrency, stop))
    await asyncio.sleep(args.seconds)
    stop.set()
    before = await before_task

    async with httpx.AsyncClient(base_url=url, timeout=120, headers=ADMIN) as client:
        stop = asyncio.Event()
        during_task = asyncio.create_task(searches(url, requests, args.concurrency, stop))
        started = time.perf_counter()
        response = await client.post(f"/admin/tasks/{NEW_TASK}/index")
        assert response.status_code == 202, response.text
        accepted = 0
        while True:
            if accepted < len(uploads):
                files = {"images": (f"live-{accepted}.png", uploads[accepted], "image/png")}
                if (await client.post("/images", files=files)).status_code == 201:
                    accepted += 1
            status = (await client.get(f"/admin/tasks/{NEW_TASK}/index")).json()
            if status["state"] != "running":
                break
            await asyncio.sleep(0.05)
        wall = time.perf_counter() - started
        stop.set()
        during = await during_task
        tasks = {t["name"]: t for t in (await client.get("/tasks")).json()["tasks"]}
    assert status["state"] == "done", status
    return {
        "gallery": args.gallery,
        "job_wall_s": wall,
        "embedded": status["embedded"],
        "images_per_s": status["embedded"] / wall,
        "search_p50_ms_before": _ms(before, 0.5),
        "search_p99_ms_before": _ms(before, 0.99),
        "search_p50_ms_during": _ms(during, 0.5),
        "search_p99_ms_during": _ms(during, 0.99),
        "searches_during": len(during),
        "uploads_during": accepted,
        "new_task_gallery_size": tasks[NEW_TASK]["gallery_size"],
        "indexed": tasks[NEW_TASK]["indexed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gallery", type=int, default=4000, help="images in the temporary gallery")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent searches before and during")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the 'before' search level")
    parser.add_argument("--json", type=json_out, help="also write the report here")
    args = parser.parse_args()

    from model.data.synthfaces import render_face
    from model.run import load_run

    with tempfile.TemporaryDirectory(prefix="modret-live-task-") as tmp:
        started = time.perf_counter()
        run, index = build_fixture(Path(tmp), args.gallery)
        child = child_run(Path(run), Path(tmp) / "child")
        print(
            f"built model + {args.gallery}-image gallery in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        images = []
        for i in range(32):
            buffer = io.BytesIO()
            render_face(99, i, 128)[0].save(buffer, "PNG")
            images.append(buffer.getvalue())
        uploads = []
        for i in range(200):
            buffer = io.BytesIO()
            render_face(77, i, 64)[0].save(buffer, "PNG")
            uploads.append(buffer.getvalue())
        port = free_port()
        process = mp.get_context("spawn").Process(
            target=serve, args=(str(child), str(index), port), daemon=True
        )
        process.start()
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process)
            old_tasks = [t for t in load_run(child).task_names if t != NEW_TASK]
            report = asyncio.run(bench(url, search_requests(url, images, old_tasks), uploads, args))
        finally:
            process.terminate()
            process.join(30)
    machine = platform.processor() or platform.machine()
    report["machine"] = f"{machine}, {mp.cpu_count()} CPUs, Python {platform.python_version()}"
    report["command"] = " ".join(sys.argv)
    print(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
