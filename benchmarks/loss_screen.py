"""One modulated CelebA run of the real-data budget with some fields changed (not a test): the screen that
chose the proxy loss, the width, the steps and the flips of ``model.compare.REAL_DATA_BUDGET``.

    .venv/bin/python benchmarks/loss_screen.py OUT '{"loss": "triplet", "width": 16}'

The JSON object's fields are ``TrainConfig`` fields put over the budget; the line printed is the mean and
per-task test triplet accuracy (official 7, identity-disjoint split) and the wall time.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.compare import compare_budget
from model.data import TASK_PRESETS
from model.train import DataConfig, TrainConfig, train

DATA = DataConfig("celeba", "../shared/data/celeba-10k", list(TASK_PRESETS["official7"]))


def main() -> None:
    out, changes = Path(sys.argv[1]), json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    cfg = replace(TrainConfig(data=DATA, device="cpu", **compare_budget("celeba").train_options()), **changes)
    started = time.perf_counter()
    test = train(cfg, out, progress=False)["test"]
    tasks = {name: m["triplet_accuracy"] for name, m in test["tasks"].items()}
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "changes": changes,
                "mean": test["mean"]["triplet_accuracy"],
                "tasks": tasks,
                "s": round(seconds),
            }
        )
    )


if __name__ == "__main__":
    main()
