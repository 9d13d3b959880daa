"""Decoded training pixels: the uint8 cache a run decodes once before its first step, and the random
augmentations a training batch is drawn through (flips, random resized crops).

Augmentation runs on the batch tensor, never on Pillow images, so a step costs no decode.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.data.base import AttributeDataset
from model.preprocess import Preprocess, materialize
from model.progress import progress_bar


def random_crops(batch: Tensor, min_scale: float, flip: bool) -> Tensor:
    """Each image's random square crop of side ``s`` times the image's, ``s`` uniform in
    [``min_scale``, 1], at a uniform position inside the image, resized back to the input size
    (bilinear), and mirrored left-right with probability 1/2 when ``flip``.

    One affine resampling for the whole batch: (B, 3, S, S) uint8 -> (B, 3, S, S) uint8.
    """
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    n = len(batch)
    scale = min_scale + (1.0 - min_scale) * torch.rand(n)  # (B,) side fraction
    # the crop's centre, in the [-1, 1] coordinates of affine_grid: anywhere that keeps it inside
    shift = (1.0 - scale).unsqueeze(1) * (2.0 * torch.rand(n, 2) - 1.0)  # (B, 2)
    mirror = torch.where(torch.rand(n) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * mirror
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(batch.device), list(batch.shape), align_corners=False)
    resampled = F.grid_sample(batch.float(), grid, mode="bilinear", align_corners=False)
    return resampled.round_().clamp_(0, 255).to(torch.uint8)


class PixelCache:
    """Decoded uint8 images of some dataset indices, addressable by dataset index."""

    def __init__(
        self, dataset: AttributeDataset, indices: np.ndarray, preprocess: Preprocess, progress: bool
    ) -> None:
        bar = progress_bar(
            total=len(indices), desc="decode", unit=" images", leave=False, disable=not progress
        )
        with bar:
            self.pixels = materialize(dataset.load_image, list(indices), preprocess, bar.update)
        self.row = np.full(len(dataset), -1, dtype=np.int64)
        self.row[indices] = np.arange(len(indices))

    def __getitem__(self, items: np.ndarray) -> Tensor:
        return self.pixels[torch.from_numpy(self.row[items])]

    def train_batch(self, items: np.ndarray, augment: bool, crop_scale: float = 1.0) -> Tensor:
        """``self[items]`` (B, 3, S, S) uint8, each image flipped left-right with probability 1/2 when
        ``augment``, and a random resized crop of it when ``crop_scale`` < 1 (``random_crops``)."""
        batch = self[items]
        if crop_scale < 1.0:
            return random_crops(batch, crop_scale, flip=augment)
        if augment:
            flip = torch.rand(len(batch)) < 0.5
            batch[flip] = batch[flip].flip(-1)
        return batch
