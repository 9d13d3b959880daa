"""Dynamic batching: concurrent requests' images are embedded together by one model worker thread.

Requests ``submit`` jobs (a few preprocessed images and the tasks to embed them under, or all tasks) to a
bounded queue and await the job's future. The worker takes the first waiting job, gathers more until the
batch holds ``max_batch_size`` images or ``max_wait_ms`` has passed, runs the model's one seam
(``embed_tasks``: the task-independent prefix once per image, then each requested task) once per distinct
task list in the batch, and resolves every future with its rows. A full queue refuses at once
(``QueueFull``: the request is answered 503 with Retry-After) rather than letting requests time out in
line. The model only ever runs on this thread, never on the event loop.
``max_batch_size=1`` turns batching off (one job per model call, still off the loop).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from model.network import MultiTaskEmbedder
from service.telemetry import ServiceMetrics

log = logging.getLogger("service.batcher")


class QueueFull(Exception):
    """The batcher's queue is at capacity; retry later."""


class BatcherStopped(Exception):
    """The batcher is shutting down or was never started."""


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # (n, len(task_ids), D) float32, or (n, T, D) when all tasks were asked for
    queue_s: float  # submit -> the batch started
    embed_s: float  # model time of the batch this job ran in
    batch_size: int  # images in that batch


@dataclass
class _Job:
    pixels: Tensor  # (n, 3, S, S) normalised
    task_ids: tuple[int, ...] | None  # None: every task
    future: Future[EmbedResult] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return int(self.pixels.shape[0])


_STOP = object()


class Batcher:
    def __init__(
        self,
        model: MultiTaskEmbedder,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        metrics: ServiceMetrics | None = None,
        normalize: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("need max_batch_size >= 1, max_queue >= 1 and max_wait_ms >= 0")
        self.model = model
        self.num_tasks = model.num_tasks
        self.normalize = normalize  # uint8 pixels -> the model's input, applied on the model's device
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.metrics = metrics
        self._queue: queue.Queue[_Job | object] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._lock = threading.Lock()
        self.batches_run = 0
        self.images_embedded = 0

    # ---------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="modret-batcher", daemon=True)
            self._accepting = True
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Refuse new jobs, finish the queued ones, stop the worker."""
        with self._lock:
            thread, self._accepting = self._thread, False
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join(timeout)
        with self._lock:
            self._thread = None

    @property
    def running(self) -> bool:
        return self._accepting

    def queue_depth(self) -> int:
        return self._queue.qsize()

    # ---------------------------------------------------------------------------------- requests

    def submit(self, pixels: Tensor, task_ids: tuple[int, ...] | None) -> Future[EmbedResult]:
        """Queue ``pixels`` (n, 3, S, S) for embedding under ``task_ids`` (None: all tasks): uint8 (then
        normalised on the model's device by ``normalize``) or already-normalised floats."""
        if pixels.ndim != 4 or pixels.shape[0] < 1:
            raise ValueError(f"pixels must be (n, 3, S, S) with n >= 1, got {tuple(pixels.shape)}")
        if not pixels.is_floating_point() and self.normalize is None:
            raise ValueError("uint8 pixels need a batcher made with normalize=Preprocess.normalize")
        if task_ids is not None and (not task_ids or not all(0 <= t < self.num_tasks for t in task_ids)):
            raise ValueError(f"task ids must be in [0, {self.num_tasks}), got {task_ids}")
        if not self._accepting:
            raise BatcherStopped("the model worker is not running")
        job = _Job(pixels, task_ids)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"embedding queue is full ({self._queue.maxsize} jobs)") from None
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queue.qsize())
        return job.future

    async def embed(self, pixels: Tensor, task_ids: tuple[int, ...] | None) -> EmbedResult:
        """``submit`` and await the result; cancelling the await cancels the job if not yet started."""
        future = self.submit(pixels, task_ids)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    # ---------------------------------------------------------------------------------- worker

    def _run(self) -> None:
        carried: _Job | None = None
        stopping = False
        while True:
            if carried is not None:
                first: _Job | object = carried
                carried = None
            elif stopping:
                try:
                    first = self._queue.get_nowait()
                except queue.Empty:
                    return
            else:
                first = self._queue.get()
            if first is _STOP:
                stopping = True
                continue
            assert isinstance(first, _Job)
            batch, size = [first], first.size
            deadline = time.perf_counter() + self.max_wait_s
            while size < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                assert isinstance(nxt, _Job)
                if size + nxt.size > self.max_batch_size:
                    carried = nxt
                    break
                batch.append(nxt)
                size += nxt.size
            if self.metrics is not None:
                self.metrics.queue_depth.set(self._queue.qsize())
            self._run_batch(batch)

    def _run_batch(self, jobs: list[_Job]) -> None:
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.perf_counter()
        try:
            outputs = self._compute(live)
        except Exception as exc:  # the model failed: every waiting request learns it
            log.exception("batch of %d jobs failed", len(live))
            for job in live:
                job.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - started
        size = sum(job.size for job in live)
        self.batches_run += 1
        self.images_embedded += size
        if self.metrics is not None:
            self.metrics.observe_batch(size, elapsed)
        for job, vectors in zip(live, outputs, strict=True):
            queue_s = started - job.enqueued
            if self.metrics is not None:
                self.metrics.queue_seconds.observe(queue_s)
            job.future.set_result(EmbedResult(vectors, queue_s, elapsed, size))

    @torch.inference_mode()
    def _compute(self, jobs: list[_Job]) -> list[np.ndarray]:
        # One model call per distinct task list; under load nearly every job asks for the same one.
        groups: dict[tuple[int, ...] | None, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.task_ids, []).append(i)
        outputs: dict[int, np.ndarray] = {}
        device = self.model.device
        for tasks, members in groups.items():
            # uint8 crosses to the device (4x fewer bytes than float) and is normalised there.
            pixels = torch.cat([jobs[i].pixels for i in members]).to(device, non_blocking=True)
            if not pixels.is_floating_point():
                assert self.normalize is not None
                pixels = self.normalize(pixels)
            vectors = self.model.embed_tasks(pixels, tasks).float().cpu().numpy()  # (N, K, D), one copy
            offset = 0
            for i in members:
                outputs[i] = vectors[offset : offset + jobs[i].size]
                offset += jobs[i].size
        return [outputs[i] for i in range(len(jobs))]
