"""Seed robustness of the compare recipe (not a test): trains ``model.compare.compare_budget`` at several
seeds for each variant, in parallel processes, and prints one row per (variant, seed) with the tasks that
did not learn. The seed draws the initial weights and routes and the split (and synthfaces' faces).

    PYTHONPATH=. python benchmarks/seed_screen.py --seeds 0 1 2 3 4 5 --variants neck=batch neck=task \
        --device cuda --jobs 14 --json screen.json
    PYTHONPATH=. python benchmarks/seed_screen.py --dataset celeba --data-dir ../shared/data/celeba-10k \
        --tasks official7 --seeds 1 2 --variants neck=batch neck=task

A variant is a comma-separated list of ``TrainConfig`` fields (``neck=task,arch=mask``) put over the
budget. Needs only torch, numpy, pillow, safetensors, tqdm and ``model`` (runs on the GPU machine's image).
Each worker takes an equal share of the cores; on a 2-core CPU use ``--jobs 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from report import json_out, write_json

from model.data import TASK_PRESETS

UNLEARNED = 0.7  # a task under this triplet accuracy is counted as not learned


def parse_variant(text: str) -> dict[str, Any]:
    """``"neck=task,width=24"`` -> ``{"neck": "task", "width": 24}`` (numbers parsed as JSON)."""
    fields: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return fields


def run_one(variant: str, seed: int, data: dict[str, Any], device: str, threads: int) -> dict[str, Any]:
    import torch  # imported in the worker, after the fork, so that each sets its own thread count

    from model.compare import compare_budget
    from model.train import DataConfig, TrainConfig, train

    torch.set_num_threads(threads)
    options = {**compare_budget(data["dataset"]).train_options(), **parse_variant(variant)}
    cfg = TrainConfig(data=DataConfig(**data, seed=seed), seed=seed, device=device, **options)
    with tempfile.TemporaryDirectory() as out:
        metrics = train(cfg, Path(out), progress=False)
    tasks = {name: r["triplet_accuracy"] for name, r in metrics["test"]["tasks"].items()}
    return {
        "variant": variant,
        "seed": seed,
        "mean": metrics["test"]["mean"]["triplet_accuracy"],
        "unlearned": {name: round(acc, 3) for name, acc in tasks.items() if acc < UNLEARNED},
        "train_seconds": metrics["train_seconds"],
        "tasks": tasks,
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=[""], help='e.g. neck=batch neck=task ("" = budget)')
    parser.add_argument("--dataset", default="synthfaces")
    parser.add_argument("--data-dir", help="dataset root (not needed for synthfaces)")
    parser.add_argument("--tasks", help="comma-separated task names or a preset (official7, all39)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", type=json_out, help="write all rows here")
    args = parser.parse_args()
    tasks = TASK_PRESETS.get((args.tasks or "").lower()) or (args.tasks.split(",") if args.tasks else None)
    data = {"dataset": args.dataset, "data_dir": args.data_dir, "tasks": list(tasks) if tasks else None}
    jobs = [(variant, seed) for variant in args.variants for seed in args.seeds]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        variants, seeds = zip(*jobs, strict=True)
        same = [[value] * len(jobs) for value in (data, args.device, threads)]
        rows = list(pool.map(run_one, variants, seeds, *same))
    print("| variant | seed | mean acc | tasks under 0.7 | train s |")
    print("|---|---:|---:|---|---:|")
    for r in rows:
        low = ", ".join(f"{name} {acc:.2f}" for name, acc in r["unlearned"].items()) or "none"
        name = r["variant"] or "budget"
        print(f"| {name} | {r['seed']} | {r['mean']:.3f} | {low} | {r['train_seconds']:.0f} |")
    for variant in args.variants:
        means = [r["mean"] for r in rows if r["variant"] == variant]
        print(f"{variant or 'budget'}: mean over seeds {sum(means) / len(means):.3f}, worst {min(means):.3f}")
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
