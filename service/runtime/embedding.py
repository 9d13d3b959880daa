"""Turning decoded images into query vectors or gallery vectors through the batcher (never on the loop)."""

from __future__ import annotations

import numpy as np
from anyio.to_thread import run_sync
from PIL import Image

from service.runtime.batcher import BatcherStopped, EmbedResult, QueueFull
from service.runtime.errors import Overloaded
from service.runtime.images import DecodedImage, decode_image
from service.runtime.loaded import Loaded


async def decode(data: bytes, max_pixels: int) -> DecodedImage:
    return await run_sync(decode_image, data, max_pixels)


async def embed(
    loaded: Loaded, images: list[Image.Image], task_ids: tuple[int, ...] | None, retry_after_s: int
) -> EmbedResult:
    """Embeddings of ``images`` under ``task_ids`` (None: every task); ``Overloaded`` if the queue is full."""
    pixels = await run_sync(loaded.run.preprocess.stack, images)
    try:
        return await loaded.batcher.embed(pixels, task_ids)
    except QueueFull as exc:
        raise Overloaded(f"{exc}; retry shortly", retry_after_s=retry_after_s) from None
    except BatcherStopped:
        raise Overloaded("the model worker is stopping", retry_after_s=retry_after_s) from None


def split_by_task(vectors: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """(len(names), D) rows of one image -> {task: vector}."""
    return {name: np.ascontiguousarray(vectors[i], dtype=np.float32) for i, name in enumerate(names)}
