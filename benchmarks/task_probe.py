"""Is an attribute readable from a run's frozen features at all? A linear probe (not a test).

``modret task add`` can only re-weight the channels a frozen trunk already computes. This fits a logistic
regression on the pooled features after each stage (and on the projection before the neck, and on all
stages together) of a synthetic-face attribute's training split and reports its test accuracy: where the
probe is near chance, no choice of module rows can make the task retrievable, and the trunk is the limit.

    PYTHONPATH=. .venv/bin/python benchmarks/task_probe.py --run /tmp/ta/bench/parent-without-Mustache \
        --task Mustache [--rows mean|own]

``--rows mean`` embeds under a new task's starting rows (the mean of the run's rows, what ``task add``
starts from: for a run without the task); ``own`` under the run's own rows for the task (a joint run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.data import load_dataset
from model.network import MultiTaskEmbedder
from model.preprocess import Preprocess, materialize
from model.run import load_run
from model.tasks import new_task, select_tasks

PLACES = ("1", "2", "3", "4", "fc")


@torch.no_grad()
def features(
    model: MultiTaskEmbedder, pixels: torch.Tensor, preprocess: Preprocess
) -> dict[str, torch.Tensor]:
    """Pooled features after each stage, and the projection, of a one-task model: {place: (N, C)}."""
    trunk = model.trunk(0)
    out: dict[str, list[torch.Tensor]] = {place: [] for place in PLACES}
    for i in range(0, len(pixels), 256):
        images = preprocess.normalize(pixels[i : i + 256])
        ids = torch.zeros(len(images), dtype=torch.long)
        x = trunk.stem(images)
        for stage in range(len(trunk.stages)):
            x = trunk.forward_stages(x, ids, stage, stage + 1)  # modulated as the task would be
            out[str(stage + 1)].append(x.mean((2, 3)))  # (B, C, h, w) -> (B, C)
        out["fc"].append(trunk.project(x))
    return {place: torch.cat(parts) for place, parts in out.items()}


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Test accuracy of an L2-regularised logistic regression on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(a @ weight + bias, train_y) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((b @ weight + bias).argmax(1) == test_y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--rows", choices=["mean", "own"], default="mean")
    parser.add_argument("--num-images", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = load_run(args.run)
    model = (
        new_task(run.model, args.task, 0, "mean")
        if args.rows == "mean"
        else select_tasks(run.model, [args.task])
    )
    model.eval()
    data = load_dataset(
        "synthfaces", None, [args.task], image_size=run.preprocess.image_size, num_images=args.num_images
    )
    labels = torch.from_numpy(data.labels[:, 0].astype(np.int64))
    split = {name: data.split_indices(name, 0) for name in ("train", "test")}
    feats = {
        name: features(model, materialize(data.load_image, list(idx), run.preprocess), run.preprocess)
        for name, idx in split.items()
    }
    ys = {name: labels[torch.from_numpy(idx)] for name, idx in split.items()}
    majority = float(np.bincount(ys["test"].numpy()).max() / len(ys["test"]))
    print(f"{args.run} {args.task} ({args.rows} rows): majority class {majority:.3f} of the test split")
    for place in (*PLACES, "all stages"):
        pick = (
            (lambda f: torch.cat([f[p] for p in PLACES[:4]], 1))
            if place == "all stages"
            else (lambda f, p=place: f[p])
        )
        accuracy = probe(pick(feats["train"]), ys["train"], pick(feats["test"]), ys["test"])
        print(f"  {place:>10}: linear-probe test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
