"""Turning decoded images into query vectors or gallery vectors through the batcher (never on the loop)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from service.batcher import BatcherStopped, EmbedResult, QueueFull
from service.errors import ApiError
from service.images import DecodedImage, decode_image
from service.state import Loaded


def overloaded(retry_after_s: int, reason: str) -> ApiError:
    return ApiError(503, "overloaded", reason, headers={"Retry-After": str(retry_after_s)})


async def decode(data: bytes, max_pixels: int) -> DecodedImage:
    return await run_in_threadpool(decode_image, data, max_pixels)


async def embed(
    loaded: Loaded, images: list[Image.Image], task_ids: tuple[int, ...] | None, retry_after_s: int
) -> EmbedResult:
    """Embeddings of ``images`` under ``task_ids`` (None: every task); 503 when the queue is full."""
    pixels = await run_in_threadpool(loaded.run.preprocess.stack, images)
    try:
        return await loaded.batcher.embed(pixels, task_ids)
    except QueueFull as exc:
        raise overloaded(retry_after_s, f"{exc}; retry shortly") from None
    except BatcherStopped:
        raise overloaded(retry_after_s, "the model worker is stopping") from None


def split_by_task(vectors: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """(len(names), D) rows of one image -> {task: vector}."""
    return {name: np.ascontiguousarray(vectors[i], dtype=np.float32) for i, name in enumerate(names)}
