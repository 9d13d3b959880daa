"""The GPU check's serving section: the real app under uvicorn on the device, proven against the CPU service.

Run through ``benchmarks/gpu_check.py --sections serving`` (see its docstring for the wheels it needs).
In one run, on a temporary model of the demo's shape (ResNet-18 width 16, 64 px, 128-d, the 12 SynthFaces
tasks, untrained: latency does not depend on the weights) and a gallery of rendered faces:

1. **Agreement.** The same queries (each query image under each task, ``k=10``) go over HTTP to a CPU
   server and to a server on ``device``; the id lists must be identical. The device server runs the model
   in bf16 (the batcher's autocast on CUDA), so two ids whose CPU scores lie within ``TIE_TOLERANCE``
   may swap: such swaps are counted apart, any other difference is a failure.
2. **Load.** ``benchmarks/load.py``'s levels against the device server: p50/p99 and throughput at
   concurrency 1/16/64, batching on and off, and ``model_only_ms`` there.
3. **Indexing.** Gallery images embedded under every task of a 40-task model at 112 px, in image-task
   pairs per second: through the offline builder (``index.build.build_gallery``, float32) and through the
   service's batcher (uint8 in, bf16 on CUDA, every task per image).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import load
import torch

TIE_TOLERANCE = 0.02  # bf16 vs float32 cosine scores differ by up to about 1e-2
INDEX_TASKS = 40
INDEX_SIZE = 112


def _queries(count: int, size: int = 128) -> list[bytes]:
    from model.data.synthfaces import render_face

    out = []
    for i in range(count):
        buffer = io.BytesIO()
        render_face(99, i, size)[0].save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def _start(run: Path, index: Path, device: str, batch: int) -> tuple[str, mp.process.BaseProcess]:
    port = load.free_port()
    process = mp.get_context("spawn").Process(
        target=load.serve, args=(str(run), str(index), port, batch, 5.0, 1024, device), daemon=True
    )
    process.start()
    url = f"http://127.0.0.1:{port}"
    load.wait_ready(url, process, timeout=300)
    return url, process


async def _answers(url: str, images: list[bytes], tasks: list[str]) -> list[list[tuple[int, float]]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        out = []
        for image in images:
            for task in tasks:
                files = {"image": ("q.png", image, "image/png")}
                response = await client.post("/search", params={"task": task, "k": 10}, files=files)
                response.raise_for_status()
                out.append([(r["id"], r["score"]) for r in response.json()["results"]])
        return out


def compare(cpu: list[list[tuple[int, float]]], other: list[list[tuple[int, float]]]) -> dict[str, Any]:
    """Identical id lists, swaps between near ties (by the CPU scores), and real differences."""
    identical = tie_swaps = different = 0
    for want, got in zip(cpu, other, strict=True):
        want_ids, got_ids = [i for i, _ in want], [i for i, _ in got]
        if want_ids == got_ids:
            identical += 1
            continue
        cpu_score = dict(want)
        near = all(
            a == b or (b in cpu_score and abs(cpu_score[a] - cpu_score[b]) <= TIE_TOLERANCE)
            for a, b in zip(want_ids, got_ids, strict=True)
        )
        tie_swaps += near
        different += not near
    return {
        "queries": len(cpu),
        "identical": identical,
        "tie_swaps": tie_swaps,
        "different": different,
        "agree": different == 0,
    }


def check_agreement(run: Path, index: Path, device: str, images: list[bytes]) -> dict[str, Any]:
    from model.run import load_run

    tasks = load_run(run).task_names
    answers = {}
    for where in ("cpu", device):
        url, process = _start(run, index, where, 32)
        try:
            answers[where] = asyncio.run(_answers(url, images, tasks))
        finally:
            process.terminate()
            process.join(30)
    return compare(answers["cpu"], answers[device])


def check_load(run: Path, index: Path, device: str, quick: bool) -> dict[str, Any]:
    from model.run import load_run

    args = argparse.Namespace(
        concurrency=[1, 16] if quick else [1, 16, 64],
        requests=40 if quick else 400,
        max_seconds=5.0 if quick else 20.0,
        max_wait_ms=2.0,
    )
    tasks = load_run(run).task_names
    images = _queries(8 if quick else 32)
    rows = load.run_mode(args, run, index, 32, images, tasks, device)
    rows += load.run_mode(args, run, index, 1, images, tasks, device)
    return {"model_only_ms": load.model_only_ms(run, device), "levels": rows}


def _face_images(count: int, size: int) -> list[Any]:
    from model.data.synthfaces import render_face

    return [render_face(3, i, size)[0] for i in range(count)]


def check_indexing(device: str, quick: bool, root: Path) -> dict[str, Any]:
    from index.build import ImageSource, SourceImage, build_gallery, png_bytes
    from model.network import ModelConfig, create_model
    from model.run import load_run, save_run
    from service.runtime.batcher import Batcher

    torch.manual_seed(0)
    config = ModelConfig(
        task_names=[f"t{i}" for i in range(INDEX_TASKS)], width=16, image_size=INDEX_SIZE, embedding_dim=128
    )
    save_run(root / "run40", create_model(config))
    run = load_run(root / "run40", device=device)
    count = 64 if quick else 2048
    faces = _face_images(count, INDEX_SIZE)
    items = [SourceImage(f"face-{i}", image, png_bytes(image)) for i, image in enumerate(faces)]
    report = build_gallery(
        run, ImageSource(len(items), iter(items)), root / "index40", batch_size=256, store_images=False
    )
    # The service's path: uint8 pixels in, every task per image, bf16 on CUDA.
    pixels = torch.stack([torch.from_numpy(run.preprocess.to_uint8(image)) for image in faces])
    batch = min(len(faces), 64)
    batcher = Batcher(run.model, max_batch_size=batch, max_wait_ms=0, normalize=run.preprocess.normalize)
    batcher.start()
    try:
        batcher.submit(pixels[:batch], None).result(timeout=600)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        futures = [batcher.submit(pixels[i : i + batch], None) for i in range(0, len(faces), batch)]
        for future in futures:
            future.result(timeout=600)
        served_s = time.perf_counter() - started
    finally:
        batcher.stop()
    return {
        "tasks": INDEX_TASKS,
        "image_size": INDEX_SIZE,
        "images": count,
        "builder_pairs_per_second": round(report.image_tasks_per_s),
        "builder_wall_pairs_per_second": round(count * INDEX_TASKS / report.wall_s),
        "batcher_pairs_per_second": round(count * INDEX_TASKS / served_s),
    }


def check_serving(device: str, quick: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="modret-gpu-serving-") as tmp:
        root = Path(tmp)
        run, index = load.build_fixture(root, 128 if quick else 1000)
        return {
            "agreement": check_agreement(run, index, device, _queries(2 if quick else 8)),
            "load": check_load(run, index, device, quick),
            "indexing": check_indexing(device, quick, root),
        }


def print_serving(serving: dict[str, Any]) -> None:
    a = serving["agreement"]
    print(f"serving agreement (ids over HTTP vs the CPU service): {a['identical']}/{a['queries']} identical, "
          f"{a['tie_swaps']} near-tie swaps, {a['different']} different -> {a['agree']}")  # fmt: skip
    print(f"model_only_ms {serving['load']['model_only_ms']:.2f}")
    print(load.markdown(serving["load"]["levels"]))
    i = serving["indexing"]
    print(f"indexing, {i['tasks']} tasks at {i['image_size']} px: builder {i['builder_pairs_per_second']} "
          f"pairs/s (wall {i['builder_wall_pairs_per_second']}), "
          f"batcher {i['batcher_pairs_per_second']} pairs/s")  # fmt: skip
