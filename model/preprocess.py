"""Image preprocessing shared by training, evaluation, indexing and serving.

An image is centre-cropped to a square (all of its shorter side, or the fraction ``crop`` of it: a
face-recognition backbone wants the face to fill the frame), resized to ``image_size`` and normalised:
``(x / 255 - mean) / std``, with one mean/std for every channel (0.5/0.5: [-1, 1], what networks
trained from scratch here use, and what every run written before per-channel statistics loads with) or
one per channel (ImageNet's, for a pretrained backbone: its weights expect the statistics they were
trained with). The run's config.json records them. Training keeps images as uint8 tensors (4x smaller
than float) and normalises per batch, on whatever device the batch is on.
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
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB
IMAGENET_STD = (0.229, 0.224, 0.225)
Stat = float | tuple[float, ...]
MINUS_ONE_TO_ONE = ("sface",)  # pretrained backbones whose weights read [-1, 1], not ImageNet statistics


@dataclass(frozen=True)
class Preprocess:
    image_size: int
    mean: Stat = MEAN  # one value for all channels, or one per RGB channel
    std: Stat = STD
    crop: float = 1.0  # the centre square's side, as a fraction of the image's shorter side

    def __post_init__(self) -> None:
        if not 0.0 < self.crop <= 1.0:
            raise ValueError(f"preprocess crop is a fraction of the shorter side, in (0, 1], got {self.crop}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):  # config.json gives lists; keep it hashable
                if len(value) != 3:
                    raise ValueError(f"preprocess {name} needs 1 or 3 values (RGB), got {list(value)}")
                object.__setattr__(self, name, tuple(float(v) for v in value))
            else:
                object.__setattr__(self, name, float(value))

    @classmethod
    def for_backbone(
        cls, image_size: int, pretrained: bool, backbone: str = "", crop: float = 1.0
    ) -> Preprocess:
        """ImageNet statistics for pretrained ImageNet weights, [-1, 1] for a network trained from scratch
        and for SFace's face-recognition weights (``model.sface``: its first conv is scaled to [-1, 1])."""
        if pretrained and backbone not in MINUS_ONE_TO_ONE:
            return cls(image_size, IMAGENET_MEAN, IMAGENET_STD, crop)
        return cls(image_size, crop=crop)

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """PIL image -> (3, S, S) uint8: RGB, the centre square of side ``crop`` · min(W, H) resized to S.

        The crop is taken in the source's coordinates before resizing, so the work and memory are bounded
        by the source and the output, never by a resized intermediate: resizing a 1 x 200,000 strip's
        shorter side to S first would build an S x 200,000·S image (gigabytes) to keep S x S of it.
        """
        image = image.convert("RGB")
        size = self.image_size
        w, h = image.size
        side = max(1, round(min(w, h) * self.crop))
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
        if (w, h) != (size, size) or side != min(w, h):
            image = image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()  # (S, S, 3) -> (3, S, S)

    def normalize(self, pixels: Tensor) -> Tensor:
        """uint8 (..., 3, S, S) -> float32 ``(x / 255 - mean) / std``, on ``pixels``' device."""
        x = pixels.float() / 255.0
        if isinstance(self.mean, float) and isinstance(self.std, float):
            return (x - self.mean) / self.std  # bit for bit what runs written before per-channel had
        return (x - self._channels(self.mean, x)) / self._channels(self.std, x)

    @staticmethod
    def _channels(value: Stat, like: Tensor) -> Tensor:
        """(3, 1, 1) on ``like``'s device (one value broadcast to three)."""
        values = value if isinstance(value, tuple) else (value,) * 3
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(3, 1, 1)

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
