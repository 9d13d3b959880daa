"""What a training step embeds: decoded images through the whole network (``PixelInputs``), or a frozen
pretrained backbone's pooled features, computed once (``FrozenFeatures``).

``--freeze-backbone`` (``TrainConfig.freeze_backbone``) trains only what follows a pretrained backbone: the
embedding head, the neck and the modulation modules. The backbone's pooled output of each train and val
image then never changes, so it is computed once before the first step, and a step costs the head alone
(a backbone at 112 px that takes 60 ms an image on a 2-core CPU trains in minutes). It needs the
``Trunk.pooled_seam`` (nothing modulated before the last stage) and fixed images (no flips or crops).
The stored run is an ordinary one: evaluation, indexing and serving run the whole network on pixels.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from model.network import MultiTaskEmbedder
from model.pixels import PixelCache
from model.preprocess import Preprocess
from model.progress import progress_bar

BACKBONE = ("stem.", "stages.")  # a trunk's parameter names that belong to its backbone


class Inputs(Protocol):
    def embed(self, model: MultiTaskEmbedder, items: np.ndarray, task_ids: Tensor, train: bool) -> Tensor:
        """(R,) dataset indices under (R,) task ids -> (R, D); ``train``: a training batch (augmented)."""
        ...

    def embed_tasks(self, model: MultiTaskEmbedder, items: np.ndarray) -> Tensor:
        """(U,) dataset indices -> (U, T, D): each image under every task (a training batch)."""
        ...

    def project(self, model: MultiTaskEmbedder, items: np.ndarray) -> Tensor:
        """(U,) dataset indices -> (U, D): a one-task model's projections before the neck, in eval mode
        (what its neck's running statistics are estimated from)."""
        ...


class PixelInputs:
    """The decoded images, augmented for training, normalised per batch on the model's device."""

    def __init__(self, pixels: PixelCache, preprocess: Preprocess, augment: bool, crop_scale: float) -> None:
        self.pixels, self.preprocess = pixels, preprocess
        self.augment, self.crop_scale = augment, crop_scale

    def _images(self, items: np.ndarray, train: bool, device: torch.device) -> Tensor:
        batch = self.pixels.train_batch(items, self.augment, self.crop_scale) if train else self.pixels[items]
        return self.preprocess.normalize(batch.to(device))  # (B, 3, S, S) uint8 -> float

    def embed(self, model: MultiTaskEmbedder, items: np.ndarray, task_ids: Tensor, train: bool) -> Tensor:
        return model.embed(self._images(items, train, task_ids.device), task_ids)

    def embed_tasks(self, model: MultiTaskEmbedder, items: np.ndarray) -> Tensor:
        return model.embed_tasks(self._images(items, True, model.device))

    def project(self, model: MultiTaskEmbedder, items: np.ndarray) -> Tensor:
        trunk, images = model.trunk(0), self._images(items, False, model.device)
        ids = torch.zeros(len(items), dtype=torch.long, device=model.device)
        return trunk.project(trunk.forward_features(images, ids))  # (U, 3, S, S) -> (U, D)


class FrozenFeatures:
    """Every given image's pooled backbone features (``Trunk.pool_backbone``), computed once in eval mode."""

    def __init__(
        self,
        model: MultiTaskEmbedder,
        pixels: PixelCache,
        indices: np.ndarray,
        preprocess: Preprocess,
        progress: bool,
        batch_size: int = 64,
    ) -> None:
        check_frozen(model)
        trunk, device, was_training = model.trunk(0), model.device, model.training
        model.eval()
        chunks = []
        bar = progress_bar(
            total=len(indices), desc="features", unit=" images", leave=False, disable=not progress
        )
        with torch.no_grad(), bar:
            for start in range(0, len(indices), batch_size):
                part = indices[start : start + batch_size]
                images = preprocess.normalize(pixels[part].to(device))
                chunks.append(trunk.pool_backbone(images).float().cpu())  # (b, 3, S, S) -> (b, C)
                bar.update(len(part))
        model.train(was_training)
        self.table = torch.cat(chunks) if chunks else torch.empty(0)  # (N, C)
        self.row = np.full(int(indices.max(initial=-1)) + 1, -1, dtype=np.int64)
        self.row[indices] = np.arange(len(indices))

    def __getitem__(self, items: np.ndarray) -> Tensor:
        return self.table[torch.from_numpy(self.row[items])]  # (R,) -> (R, C)

    def embed(self, model: MultiTaskEmbedder, items: np.ndarray, task_ids: Tensor, train: bool) -> Tensor:
        return model.embed_pooled(self[items].to(task_ids.device), task_ids)

    def embed_tasks(self, model: MultiTaskEmbedder, items: np.ndarray) -> Tensor:
        tasks = model.num_tasks
        rows = self[items].to(model.device).repeat_interleave(tasks, dim=0)  # (U, C) -> (U*T, C)
        ids = torch.arange(tasks, device=model.device).repeat(len(items))  # image-major, as the rows
        return model.embed_pooled(rows, ids).reshape(len(items), tasks, -1)  # -> (U, T, D)

    def project(self, model: MultiTaskEmbedder, items: np.ndarray) -> Tensor:
        ids = torch.zeros(len(items), dtype=torch.long, device=model.device)
        return model.trunk(0).project_pooled(self[items].to(model.device), ids)  # (U, C) -> (U, D)


def frozen_features(
    model: MultiTaskEmbedder,
    pixels: PixelCache,
    indices: np.ndarray,
    preprocess: Preprocess,
    progress: bool,
    shared: dict[Any, Any],
    key: Any,
) -> tuple[FrozenFeatures, float]:
    """``shared[key]`` (features of one frozen backbone, weights and normalisation), computed first when
    absent; and the seconds that took (0 when they were there)."""
    check_frozen(model)
    if key in shared:
        return shared[key], 0.0
    begun = time.perf_counter()
    shared[key] = FrozenFeatures(model, pixels, indices, preprocess, progress)
    return shared[key], time.perf_counter() - begun


def freeze_backbone(model: MultiTaskEmbedder) -> None:
    """Stop the backbone's parameters from training (the optimizer is then given the rest only)."""
    for trunk in model.trunks:
        for name, parameter in trunk.named_parameters():
            if name.startswith(BACKBONE):
                parameter.requires_grad_(False)


def check_frozen(model: MultiTaskEmbedder) -> None:
    """``ValueError`` unless ``model``'s embeddings can be trained from pooled backbone features: no stage
    but the last modulated, and one backbone for every trunk (an independent model's copies all start
    from the same pretrained weights)."""
    trunk = model.trunk(0)
    if not trunk.pooled_seam:
        last = len(trunk.stages)
        raise ValueError(
            f"--freeze-backbone trains from the backbone's pooled output, so only stage {last} (the last) "
            f"and the embedding can be modulated, not {','.join(trunk.modulations)}: "
            f"use --modulate {last},emb"
        )
    reference = {n: p for n, p in trunk.state_dict().items() if n.startswith(BACKBONE)}
    for other in list(model.trunks)[1:]:
        state = other.state_dict()
        if any(not torch.equal(state[n], p) for n, p in reference.items()):
            raise ValueError(
                "--freeze-backbone needs every trunk's backbone to hold the same (pretrained) weights"
            )
