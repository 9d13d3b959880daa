"""Evaluation: per-task triplet accuracy on fixed seeded test triplets (the official metric), and
retrieval mAP and precision@10 over the test split (relevant = same value of the task's attribute).

Every test image is embedded under every task once (``MultiTaskEmbedder.embed_tasks``); all metrics read that
(N, T, D) tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.data.base import UNKNOWN, AttributeDataset
from model.data.triplets import Triplets, fixed_triplets
from model.network import MultiTaskEmbedder
from model.preprocess import Preprocess, materialize

TRIPLETS_PER_TASK = 1000
MAX_QUERIES = 2000


@torch.no_grad()
def embed_all(
    model: MultiTaskEmbedder, pixels: Tensor, preprocess: Preprocess, batch_size: int = 128
) -> Tensor:
    """uint8 (N, 3, S, S) -> (N, T, D) float32 on the CPU (``embed_tasks`` moves each chunk to the
    model's device)."""
    model.eval()
    chunks = [
        model.embed_tasks(preprocess.normalize(pixels[i : i + batch_size])).float().cpu()
        for i in range(0, len(pixels), batch_size)
    ]
    return torch.cat(chunks)


def triplet_accuracy(embeddings: Tensor, tasks: np.ndarray, task_names: list[str]) -> dict[str, float]:
    """Rows [anchors; positives; negatives] embedded under each triplet's task -> share with
    d(a, p) < d(a, n), per task."""
    a, p, n = embeddings.chunk(3)
    correct = ((a - p).pow(2).sum(1) < (a - n).pow(2).sum(1)).cpu().numpy()
    return {
        name: round(float(correct[tasks == t].mean()), 4)
        for t, name in enumerate(task_names)
        if (tasks == t).any()
    }


def _triplet_accuracy_from_table(
    table: Tensor, row: np.ndarray, triplets: Triplets, names: list[str]
) -> dict[str, float]:
    task = torch.from_numpy(triplets.task)
    rows = [
        table[torch.from_numpy(row[idx]), task]
        for idx in (triplets.anchor, triplets.positive, triplets.negative)
    ]
    return triplet_accuracy(torch.cat(rows), triplets.task, names)


def retrieval_metrics(
    table: Tensor,
    labels: np.ndarray,
    names: list[str],
    seed: int,
    max_queries: int = MAX_QUERIES,
    k: int = 10,
) -> dict[str, dict[str, float]]:
    """Per task: mAP and precision@k, each known-label test image querying all the others."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, float]] = {}
    for t, name in enumerate(names):
        known = np.flatnonzero(labels[:, t] != UNKNOWN)
        queries = (
            known if len(known) <= max_queries else np.sort(rng.choice(known, max_queries, replace=False))
        )
        gallery = torch.from_numpy(known)
        values = torch.from_numpy(labels[known, t])
        aps, precisions = [], []
        for start in range(0, len(queries), 256):
            q = torch.from_numpy(queries[start : start + 256])
            sims = table[q, t] @ table[gallery, t].T  # (q, D) x (D, G) -> (q, G)
            sims[gallery.unsqueeze(0) == q.unsqueeze(1)] = -float("inf")  # a query never retrieves itself
            order = sims.argsort(dim=1, descending=True)[:, :-1]  # drop the query's own (last) slot
            relevant = (
                values[order] == torch.from_numpy(labels[queries[start : start + 256], t]).unsqueeze(1)
            ).float()
            hits = relevant.cumsum(1)
            ranks = torch.arange(1, relevant.shape[1] + 1)
            count = relevant.sum(1)
            ap = ((hits / ranks) * relevant).sum(1) / count.clamp(min=1)
            aps.append(ap[count > 0])
            precisions.append(relevant[:, :k].mean(1))
        out[name] = {
            "map": round(float(torch.cat(aps).mean()), 4),
            f"precision_at_{k}": round(float(torch.cat(precisions).mean()), 4),
        }
    return out


def evaluate(
    model: MultiTaskEmbedder,
    dataset: AttributeDataset,
    preprocess: Preprocess,
    seed: int = 0,
    split_seed: int = 0,
    split: str = "test",
    triplets_per_task: int = TRIPLETS_PER_TASK,
) -> dict[str, Any]:
    """The eval JSON: ``{"tasks": {task: {...}}, "mean": {...}, "params": {...}}``."""
    indices = dataset.split_indices(split, split_seed)  # type: ignore[arg-type]
    pixels = materialize(dataset.load_image, list(indices), preprocess)
    table = embed_all(model, pixels, preprocess)
    row = np.full(len(dataset), -1, dtype=np.int64)
    row[indices] = np.arange(len(indices))
    official = getattr(dataset, "official_triplets", None)
    triplets = (
        official[split]
        if official and split in official
        else fixed_triplets(dataset.labels, indices, triplets_per_task, seed=seed)
    )
    names = dataset.task_names
    accuracy = _triplet_accuracy_from_table(table, row, triplets, names)
    retrieval = retrieval_metrics(table, dataset.labels[indices], names, seed)
    tasks = {
        name: {"triplet_accuracy": accuracy[name], **retrieval[name]} for name in names if name in accuracy
    }
    metric_names = ("triplet_accuracy", "map", "precision_at_10")
    mean = {m: round(float(np.mean([v[m] for v in tasks.values()])), 4) for m in metric_names}
    counts = model.parameter_counts()
    return {
        "tasks": tasks,
        "mean": mean,
        "params": {
            "total": counts["total"],
            "shared": counts["shared"],
            "per_task_extra": counts["per_task_extra"],
        },
        "split": split,
        "num_images": len(indices),
        "num_triplets": len(triplets),
    }
