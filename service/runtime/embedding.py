"""Untrusted image bytes to vectors: one worker-thread hop to uint8 pixels, then the batcher.

``prepare`` decodes (hardened, within the shared decode budget), orients, converts and resizes each image to
the model's input size off the event loop; only the small uint8 pixels leave it, and each image's decode
memory is given back as soon as its pixels exist. ``embed`` (awaited on the event loop) and
``embed_blocking`` (called from the worker thread that prepared the pixels, so a search needs no hop back
to the loop between decoding and ranking) hand the pixels to the batcher, whose worker normalises them on
the model's device; ``embed_blocking`` runs them on its own thread instead when the model is idle and
nothing is queued (``Batcher.run_if_idle``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.preprocess import Preprocess
from service.runtime.batcher import BatcherStopped, EmbedResult, QueueFull
from service.runtime.errors import Overloaded
from service.runtime.images import DecodeBudget, decode_image
from service.runtime.loaded import Loaded


@dataclass(frozen=True)
class Prepared:
    pixels: Tensor  # (N, 3, S, S) uint8, the model's input size
    sizes: list[tuple[int, int]]  # each decoded image's (width, height), EXIF orientation applied


def prepare(
    images: Sequence[bytes], max_pixels: int, budget: DecodeBudget | None, preprocess: Preprocess
) -> Prepared:
    """Blocking: decode each of ``images`` and resize it to ``preprocess``' input size."""
    arrays, sizes = [], []
    for data in images:
        decoded = decode_image(data, max_pixels, budget)
        try:
            arrays.append(preprocess.to_uint8(decoded.image))  # (3, S, S)
            sizes.append((decoded.width, decoded.height))
        finally:
            decoded.release()
    return Prepared(torch.from_numpy(np.stack(arrays)), sizes)  # -> (N, 3, S, S)


async def embed(
    loaded: Loaded, pixels: Tensor, task_ids: tuple[int, ...] | None, retry_after_s: int
) -> EmbedResult:
    """Embeddings of ``pixels`` under ``task_ids`` (None: every task); ``Overloaded`` if the queue is full."""
    try:
        return await loaded.batcher.embed(pixels, task_ids)
    except QueueFull as exc:
        raise Overloaded(f"{exc}; retry shortly", retry_after_s=retry_after_s) from None
    except BatcherStopped:
        raise Overloaded("the model worker is stopping", retry_after_s=retry_after_s) from None


@contextmanager
def admitted(
    loaded: Loaded, images: int, task_ids: tuple[int, ...] | None, retry_after_s: int
) -> Iterator[None]:
    """A request's rows counted against the batcher's bound for the block (``Batcher.admitted``);
    ``Overloaded`` on entry if they would wait past it. Entered on the event loop before the body is read
    (it takes only the batcher's row lock), so that under overload a refusal costs neither the upload nor a
    thread hop."""
    with ExitStack() as stack:
        try:
            stack.enter_context(loaded.batcher.admitted(images, task_ids))
        except QueueFull as exc:
            raise Overloaded(f"{exc}; retry shortly", retry_after_s=retry_after_s) from None
        yield


def check_room(loaded: Loaded, images: int, task_ids: tuple[int, ...] | None, retry_after_s: int) -> None:
    """``Overloaded`` now if the batcher would refuse ``images`` under ``task_ids`` (before any decoding)."""
    try:
        loaded.batcher.check_room(images, task_ids)
    except QueueFull as exc:
        raise Overloaded(f"{exc}; retry shortly", retry_after_s=retry_after_s) from None


def embed_blocking(
    loaded: Loaded, pixels: Tensor, task_ids: tuple[int, ...] | None, retry_after_s: int, timeout_s: float
) -> EmbedResult:
    """Blocking ``embed``, for a worker thread: the batcher's result within ``timeout_s`` (the request's
    own limit, after which its answer is discarded anyway), else the job is cancelled if not started."""
    try:
        done = loaded.batcher.run_if_idle(pixels, task_ids)  # a lone request: on this thread, no hand-off
        if done is not None:
            return done
        future = loaded.batcher.submit(pixels, task_ids)
    except QueueFull as exc:
        raise Overloaded(f"{exc}; retry shortly", retry_after_s=retry_after_s) from None
    except BatcherStopped:
        raise Overloaded("the model worker is stopping", retry_after_s=retry_after_s) from None
    try:
        return future.result(timeout=timeout_s)
    except TimeoutError:
        future.cancel()
        raise Overloaded(
            f"the model did not answer within {timeout_s:g} s", retry_after_s=retry_after_s
        ) from None
    except BatcherStopped:
        raise Overloaded("the model worker is stopping", retry_after_s=retry_after_s) from None


def split_by_task(vectors: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """(len(names), D) rows of one image -> {task: vector}."""
    return {name: np.ascontiguousarray(vectors[i], dtype=np.float32) for i, name in enumerate(names)}
