"""Load benchmark of the search API on loopback: throughput, p50/p99 latency and average model batch size
at several client concurrencies, with dynamic batching on and off.

    .venv/bin/python benchmarks/load.py                       # temporary model + gallery, defaults below
    .venv/bin/python benchmarks/load.py --run RUN --index INDEX --requests 400 --max-seconds 30
    .venv/bin/python benchmarks/load.py --concurrency 1 16 64 --json load.json

The server runs in its own process (``modret serve``'s server, 127.0.0.1, a free port) so the client does
not share its GIL; the client is one asyncio process with N concurrent keep-alive connections, each
posting a multipart PNG to ``POST /search?task=…&k=10``. The client is lean on purpose (requests encoded
once, responses parsed by ``httptools``, uvicorn's own parser): on two cores it shares the CPU with the
server, and an httpx client spent about 3 ms of CPU per request, more than the server's HTTP path.
Each level is bounded by ``--requests`` and ``--max-seconds``.
Average batch size comes from the server's ``modret_batch_size`` histogram (sum/count) over the level.
A 503 (shed under overload) is counted in ``shed``, any other failure in ``errors``; latencies and
throughput are of the 200s. ``model_only_ms`` is one image under one task through the loaded model in
this process (``embed_tasks``, median of 50 after warm-up, with the server's model threads,
``MODRET_TORCH_THREADS``): the floor a search's latency is compared with.

``--json PATH`` writes ``{"model_only_ms", "machine", "command", "levels": [...]}``, one object per level
with ``batching`` (bool), ``concurrency``, ``requests``, ``throughput_rps``, ``p50_ms``, ``p99_ms``,
``errors``, ``shed`` and ``avg_batch``.
Without ``--run`` a temporary untrained model of the demo's shape (ResNet-18 width 16, 64 px, 128-d, the
12 SynthFaces tasks) and a gallery of ``--gallery`` SynthFaces images are built first: latency does not
depend on the weights.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import platform
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httptools
import httpx
from report import json_out, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONCURRENCY = (1, 4, 16, 64)


def build_fixture(root: Path, gallery_size: int) -> tuple[Path, Path]:
    import torch

    from index.build import embed_images
    from index.gallery import Gallery
    from index.metadata import NewItem, content_hash
    from model.data.synthfaces import DEFAULT_TASKS, render_face
    from model.network import ModelConfig, create_model
    from model.run import load_run, save_run

    torch.manual_seed(0)
    config = ModelConfig(task_names=list(DEFAULT_TASKS), width=16, image_size=64, embedding_dim=128)
    save_run(root / "run", create_model(config))
    run = load_run(root / "run")
    gallery = Gallery.create(
        root / "index", tasks=run.task_names, dim=run.embedding_dim, model_hash=run.model_hash,
        fingerprints=run.fingerprints,
    )  # fmt: skip
    for start in range(0, gallery_size, 64):
        faces = [render_face(1, i, 64) for i in range(start, min(gallery_size, start + 64))]
        items, images = [], []
        for i, (image, labels) in enumerate(faces, start):
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            data = buffer.getvalue()
            items.append(NewItem(f"face-{i}.png", content_hash(data), 64, 64, labels, data))
            images.append(image)
        gallery.add(items, embed_images(run, images))
    gallery.save()
    gallery.close()
    return root / "run", root / "index"


def serve(
    run: str, index: str, port: int, batch: int, wait_ms: float, queue: int, device: str = "cpu"
) -> None:
    from service.api.server import build_server
    from service.settings import Settings

    settings = Settings(
        run_dir=Path(run), index_dir=Path(index), max_batch_size=batch, max_wait_ms=wait_ms, max_queue=queue,
        device=device, log_level="WARNING", host="127.0.0.1", port=port,
    )  # fmt: skip
    build_server(settings).run()  # the server `modret serve` runs: bounded request heads, draining stop


def model_only_ms(run_dir: Path, device: str = "cpu", repeats: int = 50) -> float:
    """Median ms of one image under one task through the loaded model (``embed_tasks``), after warm-up."""
    import torch

    from model.run import load_run

    torch.set_num_threads(model_threads())  # as the server's model worker runs (MODRET_TORCH_THREADS)
    run = load_run(run_dir, device=device)
    size = run.preprocess.image_size
    pixels = run.preprocess.normalize(torch.zeros((1, 3, size, size), dtype=torch.uint8)).to(run.model.device)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 5):
            started = time.perf_counter()
            run.model.embed_tasks(pixels, (i % len(run.task_names),)).cpu()
            if i >= 5:
                times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def batch_stats(metrics_text: str) -> tuple[float, float]:
    def value(name: str) -> float:
        match = re.search(rf"^{name} ([0-9.e+-]+)$", metrics_text, re.M)
        return float(match.group(1)) if match else 0.0

    return value("modret_batch_size_sum"), value("modret_batch_size_count")


def search_requests(url: str, images: list[bytes], tasks: list[str]) -> list[bytes]:
    """Every distinct request a level sends, encoded once: ``POST /search`` with a multipart image."""
    encoded = []
    for i in range(max(len(images), len(tasks))):
        request = httpx.Request(
            "POST",
            f"{url}/search",
            params={"task": tasks[i % len(tasks)], "k": 10},
            files={"image": ("q.png", images[i % len(images)], "image/png")},
        )
        body = request.read()
        head = (
            f"POST {request.url.raw_path.decode()} HTTP/1.1\r\nHost: {request.url.netloc.decode()}\r\n"
            f"Content-Type: {request.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        encoded.append(head.encode() + body)
    return encoded


class Connection:
    """One keep-alive HTTP/1.1 connection that sends pre-encoded requests and reads each response whole."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.done = False
        self.parser = httptools.HttpResponseParser(self)

    @classmethod
    async def open(cls, url: str) -> Connection:
        address = httpx.URL(url)
        return cls(*await asyncio.open_connection(address.host, address.port))

    def on_message_complete(self) -> None:  # httptools callback
        self.done = True

    async def send(self, request: bytes) -> int:
        """The response's status code; ``ConnectionError`` when the server closed the connection."""
        self.writer.write(request)
        self.done = False
        while not self.done:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.parser.feed_data(data)
        return int(self.parser.get_status_code())

    def close(self) -> None:
        self.writer.close()


async def level(
    url: str, images: list[bytes], tasks: list[str], concurrency: int, total: int, max_s: float
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = shed = 0
    sent = 0
    requests = search_requests(url, images, tasks)
    deadline = time.perf_counter() + max_s
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        before = batch_stats((await client.get("/metrics")).text)
        connections = [await Connection.open(url) for _ in range(concurrency)]

        async def worker(connection: Connection) -> None:
            nonlocal sent, errors, shed
            while sent < total and time.perf_counter() < deadline:
                i = sent
                sent += 1
                started = time.perf_counter()
                try:
                    status = await asyncio.wait_for(connection.send(requests[i % len(requests)]), 60)
                except (OSError, TimeoutError, httptools.HttpParserError):
                    errors += 1
                    connection.close()
                    connection = await Connection.open(url)
                    continue
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                elif status == 503:
                    shed += 1
                else:
                    errors += 1

        started = time.perf_counter()
        try:
            await asyncio.gather(*(worker(c) for c in connections))
        finally:
            for connection in connections:
                connection.close()
        wall = time.perf_counter() - started
        after = batch_stats((await client.get("/metrics")).text)
    batches = after[1] - before[1]
    ordered = sorted(latencies)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "throughput_rps": len(latencies) / wall if wall else 0.0,
        "p50_ms": 1000 * statistics.median(ordered) if ordered else None,
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None,
        "errors": errors,
        "shed": shed,
        "avg_batch": (after[0] - before[0]) / batches if batches else None,
    }


def wait_ready(url: str, process: mp.process.BaseProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise RuntimeError("the server process exited")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def run_mode(
    args: argparse.Namespace,
    run: Path,
    index: Path,
    batch: int,
    images: list[bytes],
    tasks: list[str],
    device: str = "cpu",
) -> list[dict[str, Any]]:
    port = free_port()
    ctx = mp.get_context("spawn")
    process = ctx.Process(
        target=serve, args=(str(run), str(index), port, batch, args.max_wait_ms, 1024, device), daemon=True
    )
    process.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        asyncio.run(level(url, images, tasks, 4, 20, 10))  # warm connections and caches
        rows = []
        for concurrency in args.concurrency:
            total = max(args.requests, 4 * concurrency)
            row = asyncio.run(level(url, images, tasks, concurrency, total, args.max_seconds))
            row = {"batching": batch > 1, **row}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        return rows
    finally:
        process.terminate()
        process.join(30)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| batching | concurrency | requests | throughput (req/s) | p50 (ms) | p99 (ms) | avg batch "
        "| shed (503) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        batch = "-" if r["avg_batch"] is None else f"{r['avg_batch']:.2f}"
        lines.append(
            f"| {'on' if r['batching'] else 'off'} | {r['concurrency']} | {r['requests']} | "
            f"{r['throughput_rps']:.1f} | {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} | {batch} | "
            f"{r['shed']} | {r['errors']} |"
        )
    return "\n".join(lines)


def ratios(report: dict[str, Any]) -> list[str]:
    """The issue's goals as ratios of this run's figures (levels that were not run are skipped)."""
    rows = {(r["batching"], r["concurrency"]): r for r in report["levels"]}
    out = []
    one = rows.get((True, 1))
    if one and one["p50_ms"]:
        floor = report["model_only_ms"]
        out.append(f"concurrency 1: p50 {one['p50_ms']:.1f} ms = {one['p50_ms'] / floor:.2f} x "
                   f"model_only_ms ({floor:.2f} ms)")  # fmt: skip
    on, off = rows.get((True, 16)), rows.get((False, 16))
    if on and off and off["throughput_rps"]:
        a, b = on["throughput_rps"], off["throughput_rps"]
        out.append(f"concurrency 16: batching on/off throughput {a:.1f} / {b:.1f} req/s = {a / b:.2f} x")
    for batching in (True, False):
        top = rows.get((batching, 64))
        if top and top["p99_ms"] is not None:
            out.append(f"concurrency 64, batching {'on' if batching else 'off'}: p99 {top['p99_ms']:.0f} ms, "
                       f"{top['shed']} shed, {top['errors']} errors")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path)
    parser.add_argument(
        "--index", type=Path, help="a gallery built for --run (copied: the benchmark never writes it)"
    )
    parser.add_argument("--gallery", type=int, default=1000, help="images in the temporary gallery")
    parser.add_argument(
        "--requests", type=int, default=200, help="requests per level (at least 4x concurrency)"
    )
    parser.add_argument("--max-seconds", type=float, default=20.0, help="time cap per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--device", default="cpu", help="the server's MODRET_DEVICE (cpu, cuda)")
    parser.add_argument("--json", type=json_out, help="also write the report (model_only_ms, levels) here")
    args = parser.parse_args()

    from model.data.synthfaces import render_face

    with tempfile.TemporaryDirectory(prefix="modret-load-") as tmp:
        if args.run is None:
            started = time.perf_counter()
            run, index = build_fixture(Path(tmp), args.gallery)
            print(
                f"built model + {args.gallery}-image gallery in {time.perf_counter() - started:.1f} s",
                file=sys.stderr,
            )
        else:
            import shutil

            run, index = args.run, Path(tmp) / "index"
            shutil.copytree(args.index, index)
            (index / "writer.lock").unlink(missing_ok=True)
        from model.run import load_run

        tasks = load_run(run).task_names
        images = []
        for i in range(32):
            buffer = io.BytesIO()
            render_face(99, i, 128)[0].save(buffer, "PNG")
            images.append(buffer.getvalue())
        model_ms = model_only_ms(Path(run), args.device)
        rows = run_mode(args, run, index, args.max_batch_size, images, tasks, args.device)
        rows += run_mode(args, run, index, 1, images, tasks, args.device)
    report = {
        "model_only_ms": model_ms,
        "machine": f"{platform.processor() or platform.machine()}, {mp.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch_version()}",
        "model_threads": model_threads(),
        "command": " ".join(sys.argv),
        "levels": rows,
    }
    print(f"machine: {report['machine']}")
    print(markdown(rows))
    print("\n".join(ratios(report)))
    if args.json:
        write_json(args.json, report)


def model_threads() -> int:
    from service.settings import Settings

    return Settings().model_threads


def torch_version() -> str:
    import torch

    return str(torch.__version__)


if __name__ == "__main__":
    main()
