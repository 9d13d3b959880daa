"""Evaluation: per-task triplet accuracy on fixed seeded test triplets (the official metric), retrieval
mAP and precision@10 over the test split (relevant = same value of the task's attribute), and leakage.

**Leakage** says how much a task's results resemble the query in what the task is *not* about. For task
``t``, query ``q`` and another attribute ``a``: the share of ``q``'s top 10 (under ``t``) whose ``a`` equals
``q``'s, minus the share expected by chance — the share among *all* gallery images holding ``q``'s value of
``t`` (``q`` itself excluded), i.e. what a perfect retriever that knows only ``t`` scores, drawing its top
10 at random from the right value. Averaged over queries, this is ``leakage_by_attribute[a]``; the task's
``leakage`` is its mean over every other attribute, ``leakage_worst`` its maximum. Conditioning chance on
``t``'s value keeps real dependencies out of it (a bald face's hair-colour labels are all 0: a perfect
``Bald`` retriever agrees on them 100 % without leaking anything); for independent attributes it is
``sum_v p(v)**2``. 0: the ranking within the right value ignores other attributes; 1 - chance (0.5 for a
fair coin): the top 10 always share ``a``. Slightly negative values occur when retrieval under ``t`` is
poor and ``a`` correlates with ``t``. Unknown labels take no part (neither as queries nor as results).
It grows with the gallery: among more images of the right value the nearest can agree on more of the
rest, so the demo's 4,000-face gallery leaks more than the 400-image test split (docs/results.md).

Every test image is embedded under every task once (``MultiTaskEmbedder.embed_tasks``); all metrics read that
(N, T, D) tensor.
"""

from __future__ import annotations

from collections.abc import Callable
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
MEAN_METRICS = ("triplet_accuracy", "map", "precision_at_10", "leakage")


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


def leakage(
    labels: np.ndarray, task: int, gallery: np.ndarray, queries: np.ndarray, top: np.ndarray
) -> dict[int, float]:
    """Per other column of ``labels``: the mean over queries of top-k agreement minus chance agreement
    (see the module docstring).

    ``labels`` (N, T) int; ``gallery`` (G,) the rows searched under ``task`` (those with a known value of
    it); ``queries`` (Q,) rows; ``top`` (Q, k) the rows each query retrieved. Returns ``{column: leakage}``
    for the columns with at least one query whose own value and some retrieved value are known.
    """
    out: dict[int, float] = {}
    value = labels[queries, task]  # (Q,)
    for a in range(labels.shape[1]):
        if a == task:
            continue
        mine = labels[queries, a]  # (Q,)
        got = labels[top, a]  # (Q, k)
        known = got != UNKNOWN
        retrieved = known.sum(1)
        observed = ((got == mine[:, None]) & known).sum(1) / np.maximum(retrieved, 1)
        # Chance: joint counts of (value of task, value of a) over the gallery, the query itself removed.
        column = labels[gallery, a]
        counted = column != UNKNOWN
        width = max(int(labels[:, a].max()), 0) + 1
        joint = np.bincount(
            labels[gallery, task][counted] * width + column[counted],
            minlength=(int(labels[:, task].max()) + 1) * width,
        ).reshape(-1, width)  # (values of task, values of a)
        same = joint[value, np.maximum(mine, 0)] - 1
        total = joint[value].sum(1) - 1
        usable = (mine != UNKNOWN) & (retrieved > 0) & (total > 0)
        if usable.any():
            out[a] = float((observed[usable] - same[usable] / total[usable]).mean())
    return out


def _leakage_summary(by_column: dict[int, float], names: list[str]) -> dict[str, Any]:
    if not by_column:
        return {"leakage": None, "leakage_worst": None, "leakage_by_attribute": {}}
    by_name = {names[c]: round(v, 4) for c, v in by_column.items()}
    return {
        "leakage": round(float(np.mean(list(by_column.values()))), 4),
        "leakage_worst": max(by_name.values()),
        "leakage_by_attribute": by_name,
    }


def retrieval_metrics(
    table: Tensor,
    labels: np.ndarray,
    names: list[str],
    seed: int,
    max_queries: int = MAX_QUERIES,
    k: int = 10,
) -> dict[str, dict[str, Any]]:
    """Per task: mAP, precision@k and leakage at k, each known-label test image querying all the others."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Any]] = {}
    for t, name in enumerate(names):
        known = np.flatnonzero(labels[:, t] != UNKNOWN)
        queries = (
            known if len(known) <= max_queries else np.sort(rng.choice(known, max_queries, replace=False))
        )
        gallery = torch.from_numpy(known)
        values = torch.from_numpy(labels[known, t])
        aps, precisions, tops = [], [], []
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
            tops.append(gallery[order[:, :k]].numpy())
        out[name] = {
            "map": round(float(torch.cat(aps).mean()), 4),
            f"precision_at_{k}": round(float(torch.cat(precisions).mean()), 4),
            **_leakage_summary(leakage(labels, t, known, queries, np.concatenate(tops)), names),
        }
    return out


def _mean(values: list[float | None]) -> float | None:
    """The mean of the known values (a one-task dataset has no leakage)."""
    known = [v for v in values if v is not None]
    return round(float(np.mean(known)), 4) if known else None


def evaluate(
    model: MultiTaskEmbedder,
    dataset: AttributeDataset,
    preprocess: Preprocess,
    seed: int = 0,
    split_seed: int = 0,
    split: str = "test",
    triplets_per_task: int = TRIPLETS_PER_TASK,
    pixels: Callable[[np.ndarray], Tensor] | None = None,
) -> dict[str, Any]:
    """The eval JSON: ``{"tasks": {task: {...}}, "mean": {...}, "params": {...}}``. ``pixels``: the
    (N, 3, S, S) uint8 images of some dataset indices, when they are decoded already (else decoded here)."""
    indices = dataset.split_indices(split, split_seed)  # type: ignore[arg-type]
    images = (
        pixels(indices) if pixels is not None else materialize(dataset.load_image, list(indices), preprocess)
    )
    table = embed_all(model, images, preprocess)
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
    mean = {m: _mean([v[m] for v in tasks.values()]) for m in MEAN_METRICS}
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
