"""Image preprocessing shared by training, evaluation, indexing and serving.

An image is resized so its shorter side is ``image_size``, centre-cropped to a square, and scaled to
[-1, 1]. Training keeps images as uint8 tensors (4x smaller than float) and normalises per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

MEAN = 0.5
STD = 0.5


@dataclass(frozen=True)
class Preprocess:
    image_size: int
    mean: float = MEAN
    std: float = STD

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """PIL image -> (3, S, S) uint8: RGB, shorter side resized to S, centre crop."""
        image = image.convert("RGB")
        size = self.image_size
        w, h = image.size
        scale = size / min(w, h)
        rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
        if (rw, rh) != (w, h):
            image = image.resize((rw, rh), Image.Resampling.BILINEAR, reducing_gap=3.0)
        left, top = (rw - size) // 2, (rh - size) // 2
        image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()  # (S, S, 3) -> (3, S, S)

    def normalize(self, pixels: Tensor) -> Tensor:
        """uint8 (..., 3, S, S) -> float32 in [-1, 1]."""
        return (pixels.float() / 255.0 - self.mean) / self.std

    def __call__(self, image: Image.Image) -> Tensor:
        return self.normalize(torch.from_numpy(self.to_uint8(image)))  # (3, S, S)

    def stack(self, images: Sequence[Image.Image]) -> Tensor:
        return self.normalize(torch.from_numpy(np.stack([self.to_uint8(im) for im in images])))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def materialize(
    load: Callable[[int], Image.Image],
    indices: Sequence[int],
    preprocess: Preprocess,
    progress: Callable[[int], object] | None = None,
    workers: int = 4,
) -> Tensor:
    """Decode and resize ``indices`` once into a (N, 3, S, S) uint8 tensor (Pillow releases the GIL
    while decoding and resizing, so threads overlap the work)."""
    out = torch.empty((len(indices), 3, preprocess.image_size, preprocess.image_size), dtype=torch.uint8)

    def one(position: int) -> None:
        out[position] = torch.from_numpy(preprocess.to_uint8(load(int(indices[position]))))
        if progress is not None:
            progress(1)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(len(indices))))
    return out
