"""The paper's gradient-direction analysis: how consistently different tasks' triplet-loss gradients
point on the parameters they share. Modulation modules should raise it (less destructive interference).

For each batch, every task's loss is back-propagated alone; the gradients on shared parameters (all
but the modulation modules) are compared pairwise by cosine similarity, over all shared parameters
together ("overall") and per layer (stem, each stage, the embedding FC). Results are averaged over
batches and over task pairs.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from model.data.base import AttributeDataset
from model.data.triplets import TripletSampler
from model.network import MultiTaskEmbedder
from model.preprocess import Preprocess, materialize
from model.train import triplet_batch, triplet_loss


def _layer(name: str) -> str:
    # "trunks.0.stages.2.1.conv1.0.weight" -> "stage3"; stem and fc keep their names.
    parts = name.split(".")
    return f"stage{int(parts[3]) + 1}" if parts[2] == "stages" else parts[2]


def gradient_consistency(
    model: MultiTaskEmbedder,
    dataset: AttributeDataset,
    preprocess: Preprocess,
    split_seed: int = 0,
    batches: int = 4,
    per_task: int = 16,
    margin: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    if model.config.arch == "independent":
        raise ValueError("independent networks share no parameters: gradient consistency is undefined")
    device = next(model.parameters()).device
    modulation = {id(p) for p in model.modulation_parameters()}
    shared = [(n, p) for n, p in model.named_parameters() if id(p) not in modulation]
    layers = sorted({_layer(n) for n, _ in shared}, key=lambda s: (s != "stem", s == "fc", s))
    names = dataset.task_names
    indices = dataset.split_indices("train", split_seed)
    sampler = TripletSampler(dataset.labels, indices, per_task, seed=seed)
    model.eval()  # running BN statistics: each task's gradient does not depend on the batch mix
    overall: list[float] = []
    per_layer: dict[str, list[float]] = {layer: [] for layer in layers}
    pair_sum = np.zeros((len(names), len(names)))
    for _ in range(batches):
        triplets = sampler.sample()
        items, tasks = triplet_batch(triplets)
        pixels = materialize(dataset.load_image, list(items), preprocess)
        images = preprocess.normalize(pixels).to(device)
        grads: list[dict[str, torch.Tensor]] = []
        for t in range(len(names)):
            rows = torch.from_numpy(np.flatnonzero(tasks == t))
            model.zero_grad(set_to_none=True)
            ids = torch.full((len(rows),), t, dtype=torch.long, device=device)
            triplet_loss(model.embed(images[rows.to(device)], ids), margin).backward()
            by_layer: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
            for n, p in shared:
                by_layer[_layer(n)].append(
                    (p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double().cpu()
                )
            grads.append({layer: torch.cat(v) for layer, v in by_layer.items()})
        for i, j in itertools.combinations(range(len(names)), 2):
            whole_i = torch.cat([grads[i][layer] for layer in layers])
            whole_j = torch.cat([grads[j][layer] for layer in layers])
            cos = float(torch.nn.functional.cosine_similarity(whole_i, whole_j, dim=0))
            overall.append(cos)
            pair_sum[i, j] += cos / batches
            pair_sum[j, i] += cos / batches
            for layer in layers:
                per_layer[layer].append(
                    float(torch.nn.functional.cosine_similarity(grads[i][layer], grads[j][layer], dim=0))
                )
    np.fill_diagonal(pair_sum, 1.0)
    return {
        "overall": round(float(np.mean(overall)), 4),
        "per_layer": {layer: round(float(np.mean(v)), 4) for layer, v in per_layer.items()},
        "tasks": names,
        "pairwise": np.round(pair_sum, 4).tolist(),
        "batches": batches,
        "triplets_per_task": per_task,
    }
