"""Adding a task without retraining (issue 15), measured on synthetic faces (not a test).

For each held-back task T: a run of the 11 other default tasks trained with the demo's budget
(``service.cli.demo.demo_train_config``), then ``model.task_runs.add_task_run`` (what ``modret task add``
runs) adds T. Reported per T: the added task's test triplet accuracy against T's in a jointly trained
12-task run with the same budget (both evaluated on the same 1,000 test triplets: the joint run restricted
to T with ``model.tasks.select_tasks``), the wall time of the whole add (loading, drawing the faces,
training, evaluation, writing), whether the 11 old tasks' vectors of a gallery are bit-identical between
parent and child, and the parameters added.

    flock /tmp/modret-heavy.lock env PYTHONPATH=. .venv/bin/python benchmarks/task_add.py \
        --out /tmp/task-add --held-back Eyeglasses Mustache Smiling [--joint data/runs/demo]

Runs already in ``--out`` (``parent-without-T``, ``joint12``) are reused; children are rewritten.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from report import json_out, write_json

from model.data import load_dataset
from model.data.synthfaces import DEFAULT_TASKS
from model.evaluate import evaluate
from model.preprocess import materialize
from model.run import METRICS, LoadedRun, load_run
from model.task_runs import TaskTrainConfig
from model.tasks import select_tasks
from model.train import TrainConfig, train
from service.cli.demo import DEMO_IMAGES, DEMO_STEPS, DEMO_WIDTH, demo_train_config

# `modret task add` in a fresh process: the wall time a user sees, imports and all.
MODRET = [sys.executable, "-c", "from service.cli import app; app()"]
GALLERY = 1000  # faces whose vectors are compared (the demo gallery's first 1,000: family 0)
BATCH = 64  # `modret index build`'s default batch size


def trained(run_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    """The run's metrics, training it first when it is not complete."""
    if not (run_dir / METRICS).is_file():
        train(cfg, run_dir, progress=False)
    return dict(json.loads((run_dir / METRICS).read_text()))


@torch.no_grad()
def gallery_vectors(run: LoadedRun, pixels: torch.Tensor, tasks: list[int]) -> torch.Tensor:
    """(N, K, D): the gallery embedded in ``BATCH``-image batches under ``tasks``, as an index build does."""
    parts = [
        run.model.embed_tasks(run.preprocess.normalize(pixels[i : i + BATCH]), tasks).cpu()
        for i in range(0, len(pixels), BATCH)
    ]
    return torch.cat(parts)


def measure(
    held: str, out: Path, joint: LoadedRun, pixels: torch.Tensor, cfgs: list[TaskTrainConfig]
) -> list[dict[str, Any]]:
    """One row per config in ``cfgs``: T added to the run trained without it, against the joint run."""
    base = demo_train_config(DEMO_STEPS, DEMO_WIDTH, DEMO_IMAGES, "cpu")
    others = [t for t in DEFAULT_TASKS if t != held]
    parent_dir = out / f"parent-without-{held}"
    parent_metrics = trained(parent_dir, replace(base, data=replace(base.data, tasks=others)))
    dataset = load_dataset("synthfaces", None, [held], image_size=64, num_images=DEMO_IMAGES, seed=0)
    alone = evaluate(select_tasks(joint.model, [held]), dataset, joint.preprocess, seed=0)["tasks"][held]
    parent = load_run(parent_dir)
    old = list(range(len(others)))
    before = gallery_vectors(parent, pixels, old)
    rows = []
    for cfg in cfgs:
        child_dir = out / f"child-{held}-{cfg.init}-{cfg.loss}"
        shutil.rmtree(child_dir, ignore_errors=True)
        started = time.perf_counter()
        data = ["--dataset", "synthfaces", "--num-images", str(DEMO_IMAGES)]
        command = [*MODRET, "task", "add", "--run", str(parent_dir), "--task", held, "--out", str(child_dir)]
        subprocess.run(
            [*command, *data, "--device", "cpu", *cli_options(cfg)], check=True, stdout=subprocess.DEVNULL
        )
        seconds = time.perf_counter() - started
        report = json.loads((child_dir / METRICS).read_text())["added_task"]
        child = load_run(child_dir)
        after = gallery_vectors(child, pixels, old)
        every = gallery_vectors(child, pixels, [*old, len(others)])[:, : len(others)]  # all 12 at once
        added = report["test"]["tasks"][held]
        rows.append(
            {
                "task": held,
                "init": cfg.init,
                "loss": cfg.loss,
                "added_accuracy": added["triplet_accuracy"],
                "joint_accuracy": alone["triplet_accuracy"],
                "ratio": round(added["triplet_accuracy"] / alone["triplet_accuracy"], 4),
                "joint_accuracy_in_its_own_eval": joint_eval(joint)[held],
                "added_map": added["map"],
                "joint_map": alone["map"],
                "seconds": round(seconds, 1),
                "train_seconds": report["train_seconds"],
                "old_bit_identical": bool(torch.equal(before, after)),
                "old_bit_identical_all_tasks_batch": bool(torch.equal(before, every)),
                "old_max_abs_diff_all_tasks_batch": float((before - every).abs().max()),
                "added": report["added"],
                "per_task_extra": parent.model.parameter_counts()["per_task_extra"],
                "parent_mean_accuracy": parent_metrics["test"].get("mean", {}).get("triplet_accuracy"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def cli_options(cfg: TaskTrainConfig) -> list[str]:
    options = {
        "--steps": cfg.steps,
        "--per-task": cfg.per_task,
        "--lr": cfg.lr,
        "--seed": cfg.seed,
        "--init": cfg.init,
        "--loss": cfg.loss,
    }
    return [str(x) for option, value in options.items() if value is not None for x in (option, value)]


def joint_eval(joint: LoadedRun) -> dict[str, float]:
    metrics = json.loads((joint.run_dir / METRICS).read_text())
    return {t: m["triplet_accuracy"] for t, m in metrics["test"]["tasks"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/task-add"))
    parser.add_argument("--held-back", nargs="+", default=["Eyeglasses", "Mustache", "Smiling"])
    parser.add_argument("--joint", type=Path, help="a jointly trained 12-task demo run (default: train one)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--per-task", type=int)
    parser.add_argument("--inits", nargs="+", default=["routing", "mean"], help="new rows' starts to compare")
    parser.add_argument("--losses", nargs="+", default=["triplet"], help="losses to compare (triplet, proxy)")
    parser.add_argument("--json", type=json_out, help="also write the rows here")
    args = parser.parse_args()
    given = {"steps": args.steps, "lr": args.lr, "per_task": args.per_task}
    cfg = replace(TaskTrainConfig(), **{k: v for k, v in given.items() if v is not None})
    cfgs = [replace(cfg, init=init, loss=loss) for init in args.inits for loss in args.losses]

    joint_dir = args.joint or args.out / "joint12"
    trained(joint_dir, demo_train_config(DEMO_STEPS, DEMO_WIDTH, DEMO_IMAGES, "cpu"))
    joint = load_run(joint_dir)
    gallery = load_dataset("synthfaces", None, None, image_size=64, num_images=GALLERY, seed=0)
    pixels = materialize(gallery.load_image, list(range(GALLERY)), joint.preprocess)  # (N, 3, S, S) uint8
    rows = [row for held in args.held_back for row in measure(held, args.out, joint, pixels, cfgs)]
    print(f"task add config: {asdict(cfg)}, inits {args.inits}, losses {args.losses}; joint run: {joint_dir}")
    print(
        "| held-back task | init | loss | added (task add) | joint 12-task | ratio | mAP added / joint "
        "| task add wall s | 11 old tasks bit-identical | parameters added |"
    )
    print("|---|---|---|---:|---:|---:|---|---:|---|---:|")
    for r in rows:
        print(
            f"| {r['task']} | {r['init']} | {r['loss']} | {r['added_accuracy']:.3f} "
            f"| {r['joint_accuracy']:.3f} "
            f"| {r['ratio']:.3f} | "
            f"{r['added_map']:.3f} / {r['joint_map']:.3f} | {r['seconds']:.0f} | "
            f"{'yes' if r['old_bit_identical'] else 'NO'} | {r['added']['parameters']:,} "
            f"(+ {r['added']['buffers']} neck statistics) |"
        )
    if args.json:
        report = {"config": asdict(cfg), "inits": args.inits, "losses": args.losses, "rows": rows}
        write_json(args.json, report)


if __name__ == "__main__":
    main()
