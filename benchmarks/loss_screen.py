"""Modulated CelebA runs of a budget with some fields changed (not a test): the screen that chose the proxy
loss, the width, the steps and the flips of ``model.compare.REAL_DATA_BUDGET``, and the head's lr and the
crop of ``FACE_BUDGET``.

    .venv/bin/python benchmarks/loss_screen.py OUT '{"loss": "triplet", "width": 16}' ['{"seed": 1}' ...]

Each JSON object's fields are ``TrainConfig`` fields put over the budget of its backbone (the from-scratch
ResNet's, ``REAL_DATA_BUDGET``, unless it names another: ``{"backbone": "sface"}`` starts from
``FACE_BUDGET``); each prints one line: the mean and per-task test triplet accuracy (official 7,
identity-disjoint split), the wall time, and the seconds spent computing a frozen backbone's features.
Variants with the same input size and crop share one decode, and over one frozen backbone one set of
features, so a screen of head settings costs the features once.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.compare import DecodedData, compare_budget
from model.data import TASK_PRESETS
from model.train import DataConfig, TrainConfig, train

DATA = DataConfig("celeba", "../shared/data/celeba-10k", list(TASK_PRESETS["official7"]))


def main() -> None:
    out = Path(sys.argv[1])
    variants = [json.loads(arg) for arg in sys.argv[2:]] or [{}]
    decoded: dict[tuple[int, float], DecodedData] = {}  # one decode (and frozen features) per input
    for i, changes in enumerate(variants):
        # the budget of the backbone asked for: the from-scratch ResNet's unless a variant names another
        budget = compare_budget("celeba", changes.get("backbone", "resnet18"))
        cfg = replace(TrainConfig(data=DATA, device="cpu", **budget.train_options()), **changes)
        key = (cfg.image_size, cfg.center_crop)
        if key not in decoded:
            decoded[key] = DecodedData.load(DATA, cfg.image_size, progress=False, crop=cfg.center_crop)
        started = time.perf_counter()
        metrics = train(cfg, out / str(i) if len(variants) > 1 else out, progress=False, decoded=decoded[key])
        test = metrics["test"]
        tasks = {name: m["triplet_accuracy"] for name, m in test["tasks"].items()}
        line = {"changes": changes, "mean": test["mean"]["triplet_accuracy"], "tasks": tasks}
        line |= {"s": round(time.perf_counter() - started), "features_s": round(metrics["features_seconds"])}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
