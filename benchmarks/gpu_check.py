"""One self-contained GPU check (never run in CI): trains a few hundred steps on CUDA, checks CPU/GPU
agreement of embeddings, and measures training and inference images/s in bf16 at 112 and 224 px; the
``serving`` section runs the real service on the GPU.

The ``model`` sections need only torch, numpy, pillow, safetensors and this repository on the path:

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.json --sections model

The ``serving`` section (``benchmarks/gpu_serving.py``) also needs the service's wheels (fastapi, uvicorn,
httpx, faiss-cpu, pydantic-settings, prometheus-client, python-multipart), which the GPU machine does not
have: carry a wheelhouse made here (``.venv/bin/pip download -d shared/wheels <those>``) and install it
there with ``pip install --no-index --find-links shared/wheels <those>``. Then

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.json          # every section
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --sections serving --quick   # CPU dry run

Prints a short table at the end and writes the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from report import json_out, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the serving section's benchmarks/gpu_serving.py

from model.network import ModelConfig, create_model
from model.run import load_run
from model.train import DataConfig, TrainConfig, train

AGREEMENT_ATOL = 2e-3  # fp32 CPU vs fp32 GPU (TF32 off): cuDNN and MKL sum in different orders


def check_training(device: str, steps: int, out: Path) -> dict[str, Any]:
    cfg = TrainConfig(data=DataConfig(num_images=4000), width=32, steps=steps, device=device)
    started = time.perf_counter()
    metrics = train(cfg, out, progress=False)
    return {
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
        "train_images_per_second": metrics["images_per_second"],
        "mean_triplet_accuracy": metrics["test"]["mean"]["triplet_accuracy"],
    }


@torch.no_grad()
def check_agreement(run_dir: Path, device: str) -> dict[str, Any]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu, gpu = load_run(run_dir, "cpu"), load_run(run_dir, device)
    images = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tasks = torch.arange(64) % len(cpu.task_names)
    a = cpu.model.embed(images, tasks)
    b = gpu.model.embed(images.to(device), tasks.to(device)).cpu()
    # embed_tasks takes CPU input on a GPU model (it moves the images itself), as the service does.
    every = (cpu.model.embed_tasks(images) - gpu.model.embed_tasks(images).cpu()).abs().max()
    worst = max(float((a - b).abs().max()), float(every))
    return {"max_abs_diff": worst, "atol": AGREEMENT_ATOL, "agree": worst <= AGREEMENT_ATOL}


def _timed(fn: Any, repeats: int, device: str) -> float:
    for _ in range(3):
        fn()  # warm-up: cuDNN autotuning, allocator
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def measure_throughput(
    size: int, batch: int, device: str, repeats: int, num_tasks: int = 40
) -> dict[str, Any]:
    cfg = ModelConfig(task_names=[f"t{i}" for i in range(num_tasks)], image_size=size)
    model = create_model(cfg).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    tasks = torch.arange(batch, device=device) % num_tasks
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16)

    def train_step() -> None:
        with amp:
            loss = model.embed(images, tasks).float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer() -> None:
        with amp:
            model.embed(images, tasks)

    @torch.no_grad()
    def infer_all_tasks() -> None:
        with amp:
            model.embed_tasks(images[: max(1, batch // num_tasks)])

    model.train()
    train_s = _timed(train_step, repeats, device)
    model.eval()
    infer_s = _timed(infer, repeats, device)
    all_s = _timed(infer_all_tasks, repeats, device)
    return {
        "image_size": size,
        "batch": batch,
        "train_images_per_second": round(batch / train_s),
        "infer_images_per_second": round(batch / infer_s),
        "gallery_image_task_pairs_per_second": round(max(1, batch // num_tasks) * num_tasks / all_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--out", type=json_out, default=Path("gpu_check.json"))
    parser.add_argument("--sections", nargs="+", choices=("model", "serving"), default=["model", "serving"])
    parser.add_argument("--quick", action="store_true", help="serving: small sizes (a CPU dry run)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "CUDA is not available: this script checks a GPU machine (use --device cpu to smoke-test)"
        )
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
    }
    if "model" in args.sections:
        with tempfile.TemporaryDirectory() as tmp:
            report["training"] = check_training(args.device, args.steps, Path(tmp))
            report["agreement"] = check_agreement(Path(tmp), args.device)
        report["throughput_bf16"] = [
            measure_throughput(s, args.batch, args.device, args.repeats) for s in args.sizes
        ]
    if "serving" in args.sections:
        from gpu_serving import check_serving, print_serving  # needs the service's wheels

        report["serving"] = check_serving(args.device, quick=args.quick)
    write_json(args.out, report)
    print(f"device: {report['device']}  torch {report['torch']}")
    if "serving" in report:
        print_serving(report["serving"])
    if "model" not in args.sections:
        return
    t = report["training"]
    print(f"training: {t['steps']} steps in {t['seconds']} s, {t['train_images_per_second']} img/s, "
          f"mean triplet acc {t['mean_triplet_accuracy']:.3f}")  # fmt: skip
    a = report["agreement"]
    print(f"CPU/GPU agreement: max |diff| {a['max_abs_diff']:.2e} (atol {a['atol']}) -> {a['agree']}")
    print("| px | batch | train img/s | infer img/s | gallery image-task pairs/s |")
    for r in report["throughput_bf16"]:
        print(f"| {r['image_size']} | {r['batch']} | {r['train_images_per_second']} | "
              f"{r['infer_images_per_second']} | {r['gallery_image_task_pairs_per_second']} |")  # fmt: skip


if __name__ == "__main__":
    main()
