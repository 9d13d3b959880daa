"""Dynamic batching: concurrent requests' images are embedded together by one model worker thread.

Requests ``submit`` jobs (a few preprocessed images and the tasks to embed them under, or all tasks) to a
bounded queue and await the job's future. The worker takes the first waiting job and every job already
queued behind it; it waits for more (until the batch holds ``max_batch_size`` images or ``max_wait_ms``
has passed) only while requests announced with ``expecting()`` are still preparing their pixels, so a
lone request never waits for company that is not coming, and under load the jobs that queued while the
model ran form the next batch. It then runs the model once for the whole batch, whatever each job's
tasks (``embed_pairs``: every job's images under its own tasks as rows of one mixed-task batch, the
task-independent prefix once per image), and resolves every future with its rows. A full queue refuses at once
(``QueueFull``: the request is answered 503 with Retry-After) rather than letting requests time out in
line. The model only ever runs on this thread, never on the event loop.
``max_batch_size=1`` turns batching off (one job per model call, still off the loop). With shedding by
measured delay (the default) the worker also measures which batch size up to ``max_batch_size`` runs the
most rows a second, and batches no larger (``batch_limit``): on a CPU a large CNN can run slower per image
in a big batch than alone.

A request that finds the model idle and nothing queued does not hand its job over: ``run_if_idle`` runs
it on the caller's own worker thread, under the same model lock the worker takes for a batch. A lone
search so saves two thread wake-ups (to the worker and back), which on a small CPU cost about as much as
the plumbing around them; as soon as requests overlap, the second finds the lock held, the queue
non-empty or another request announced (``expecting``) and queues for the worker as before, so batching
under load is unchanged. The model still runs one call at a time and never on the event loop.

Load shedding: a job's cost is its image-task rows (images × tasks asked for). Besides the job count
(``max_queue``), the rows ahead of a new job are bounded by what the model gets through in
``max_queue_delay_s``: the worker measures its throughput (rows/s) on a full batch before it takes any job,
and keeps the estimate current from every batch it runs (under load the model runs slower than it did
alone, and a slow model's batches are smaller than full). The rows ahead are the queued ones plus what is
left of the batch in the model (its rows less the throughput times how long it has run): for a model
whose full batch takes most of the budget, the batch being computed is most of a new job's wait. A job
that would wait longer is refused at once (``QueueFull``, a 503 with Retry-After), so under overload
latency stays bounded instead of growing with the queue. ``max_queued_rows`` fixes a bound on the queued
rows alone instead of measuring it. A job arriving at an empty queue is always taken, however large.
Requests are also counted from before their bodies are read until they end (``admitted``): at high
concurrency most requests in flight are waiting for a worker thread or decoding, where the queue cannot
see them, so the bound counts the admitted rows when they are more than the queue and the batch in the
model, and a request past it is refused before it costs an upload or a thread hop.

``threads`` sets the worker's torch intra-op threads (``Settings.model_threads``: half the CPUs by default):
one image through a small CNN gains little from a second thread, and spinning OpenMP threads take the
cores that the event loop and image decoding need.

On CUDA the worker runs the model in bf16 autocast on channels-last input (the model is converted to
channels-last once); on the CPU it runs in float32 exactly as called.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager, nullcontext
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
    rows: int = 0  # image-task rows: its cost, what the shedding bound counts

    @property
    def size(self) -> int:
        return int(self.pixels.shape[0])


_STOP = object()
_POLL_S = 0.0005  # how often a forming batch re-checks whether a request is still on its way
_EWMA = 0.2  # weight of the newest batch in the throughput estimate
_CALIBRATION_RUNS = 3  # timed full batches at start (after one untimed) when the bound is derived


class Batcher:
    def __init__(
        self,
        model: MultiTaskEmbedder,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        metrics: ServiceMetrics | None = None,
        normalize: Callable[[Tensor], Tensor] | None = None,
        max_queue_delay_s: float | None = 1.0,
        max_queued_rows: int | None = None,
        mixed_precision: bool = True,
        threads: int | None = None,
        run_idle_inline: bool = True,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("need max_batch_size >= 1, max_queue >= 1 and max_wait_ms >= 0")
        if (max_queue_delay_s is not None and max_queue_delay_s <= 0) or (
            max_queued_rows is not None and max_queued_rows < 1
        ):
            raise ValueError("need max_queue_delay_s > 0 and max_queued_rows >= 1 when given")
        self.model = model
        self.num_tasks = model.num_tasks
        self.normalize = normalize  # uint8 pixels -> the model's input, applied on the model's device
        self.max_batch_size = max_batch_size
        # Images per model call: max_batch_size, or the size calibration measured fastest (never more).
        self.batch_limit = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.metrics = metrics
        self.max_queue_delay_s = max_queue_delay_s
        self._fixed_bound = max_queued_rows
        self.rows_per_second: float | None = None  # measured model throughput, image-task rows
        self.threads = threads  # torch intra-op threads of the worker (None: torch's default)
        self.run_idle_inline = run_idle_inline  # ``run_if_idle`` may run a job on its caller's thread
        self._model_lock = threading.Lock()  # held by whoever runs the model: one call at a time
        self.cuda = model.device.type == "cuda"
        self._autocast = self.cuda and mixed_precision
        if self.cuda:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack it
        self._queue: queue.Queue[_Job | object] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._lock = threading.Lock()
        self._rows_lock = threading.Lock()  # guards _queued_rows, _admitted_rows, _running and _expected
        self._expected = 0  # requests preparing pixels that will be submitted soon
        self._queued_rows = 0
        self._admitted_rows = 0  # rows of requests admitted (``admit``) and not yet ended
        self._running: tuple[int, float] | None = None  # rows in the model now, and since when
        self.batches_run = 0
        self.images_embedded = 0
        self.inline_runs = 0  # jobs ``run_if_idle`` ran on their caller's thread

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

    @property
    def busy(self) -> bool:
        """The model is running a call now (the worker's batch or an inline job)."""
        return self._model_lock.locked()

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def rows_ahead(self) -> int:
        """The image-task rows a job submitted now waits for: the queued ones and what is left of the batch
        in the model (what a measured bound counts)."""
        with self._rows_lock:
            return self._queued_rows + self._running_left()

    @property
    def max_queued_rows(self) -> int | None:
        """The shedding bound in image-task rows: fixed, or throughput x ``max_queue_delay_s`` once
        measured (None: no bound yet, or shedding by delay is off)."""
        if self._fixed_bound is not None:
            return self._fixed_bound
        if self.max_queue_delay_s is None or self.rows_per_second is None:
            return None
        return max(self.batch_limit, int(self.rows_per_second * self.max_queue_delay_s))

    @max_queued_rows.setter
    def max_queued_rows(self, rows: int | None) -> None:
        """Fix the bound (None: measure it again from throughput x ``max_queue_delay_s``)."""
        if rows is not None and rows < 1:
            raise ValueError(f"max_queued_rows must be at least 1, got {rows}")
        self._fixed_bound = rows

    def _rows(self, images: int, task_ids: tuple[int, ...] | None) -> int:
        return images * (self.num_tasks if task_ids is None else len(task_ids))

    # ---------------------------------------------------------------------------------- requests

    @contextmanager
    def expecting(self) -> Iterator[None]:
        """Announce a job about to be submitted (wrap the pixel preparation): the worker may wait up to
        ``max_wait_ms`` for it to join the batch it is forming."""
        with self._rows_lock:
            self._expected += 1
        try:
            yield
        finally:
            with self._rows_lock:
                self._expected -= 1

    def _check(self, pixels: Tensor, task_ids: tuple[int, ...] | None) -> None:
        if pixels.ndim != 4 or pixels.shape[0] < 1:
            raise ValueError(f"pixels must be (n, 3, S, S) with n >= 1, got {tuple(pixels.shape)}")
        if not pixels.is_floating_point() and self.normalize is None:
            raise ValueError("uint8 pixels need a batcher made with normalize=Preprocess.normalize")
        if task_ids is not None and (not task_ids or not all(0 <= t < self.num_tasks for t in task_ids)):
            raise ValueError(f"task ids must be in [0, {self.num_tasks}), got {task_ids}")
        if not self._accepting:
            raise BatcherStopped("the model worker is not running")

    def submit(self, pixels: Tensor, task_ids: tuple[int, ...] | None) -> Future[EmbedResult]:
        """Queue ``pixels`` (n, 3, S, S) for embedding under ``task_ids`` (None: all tasks): uint8 (then
        normalised on the model's device by ``normalize``) or already-normalised floats."""
        self._check(pixels, task_ids)
        job = _Job(pixels, task_ids, rows=self._rows(int(pixels.shape[0]), task_ids))
        with self._rows_lock:
            self._refuse_past_bound(job.rows)
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(f"embedding queue is full ({self._queue.maxsize} jobs)") from None
            self._queued_rows += job.rows
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queue.qsize())
        return job.future

    @contextmanager
    def admitted(self, images: int, task_ids: tuple[int, ...] | None) -> Iterator[None]:
        """Count a request's rows from before its body is read until it ends (the block); ``QueueFull`` on
        entry if they would wait past the bound. Ahead of it are the admitted requests still in flight
        (reading their bodies, waiting for a worker thread, decoding, queued, in the model) or, if more,
        the queue and the batch in the model: the queue alone does not see requests that wait for a thread
        or decode, which at high concurrency are most of them."""
        rows = self._rows(images, task_ids)
        with self._rows_lock:
            self._refuse_past_bound(rows, admitted=self._admitted_rows)
            self._admitted_rows += rows
        try:
            yield
        finally:
            with self._rows_lock:
                self._admitted_rows -= rows

    @property
    def admitted_rows(self) -> int:
        return self._admitted_rows

    def check_room(self, images: int, task_ids: tuple[int, ...] | None) -> None:
        """``QueueFull`` now if a job of ``images`` under ``task_ids`` would be refused were it submitted
        now: a request checks before it decodes, so that under overload a refusal costs no decoding."""
        with self._rows_lock:
            self._refuse_past_bound(self._rows(images, task_ids))

    def _refuse_past_bound(self, rows: int, admitted: int = 0) -> None:
        """``QueueFull`` if ``rows`` more would wait past the bound, behind the queue and the batch in the
        model, or behind ``admitted`` rows if more. Called under ``_rows_lock``."""
        bound = self.max_queued_rows
        ahead = max(admitted, self._queued_rows + self._running_left())
        if bound is not None and (self._queued_rows or admitted) and ahead + rows > bound:
            raise QueueFull(
                f"the model is {ahead} image-task rows behind, over the "
                f"{self.max_queue_delay_s} s it may queue ({bound} rows)"
            )

    def _running_left(self) -> int:
        """Rows of the batch in the model that it has not got through yet, by the throughput estimate
        (0 with a fixed bound, which counts queued rows only). Called under ``_rows_lock``."""
        if self._running is None or self._fixed_bound is not None or not self.rows_per_second:
            return 0
        rows, since = self._running
        return max(0, int(rows - (time.perf_counter() - since) * self.rows_per_second))

    def _model_runs(self, rows: int | None) -> None:
        """Mark ``rows`` as in the model from now (None: the model call ended)."""
        with self._rows_lock:
            self._running = None if rows is None else (rows, time.perf_counter())

    def run_if_idle(self, pixels: Tensor, task_ids: tuple[int, ...] | None) -> EmbedResult | None:
        """Blocking: embed ``pixels`` on the calling thread if the model is idle and nothing is queued
        (a lone request skips the hand-off to the worker and back); None otherwise, and the caller
        ``submit``s. Checked as ``submit`` checks; the worker's thread count applies on this thread too."""
        self._check(pixels, task_ids)
        if not self.run_idle_inline or not self._queue.empty() or self._expected:
            return None  # others are queued or about to be: batch with them on the worker
        if not self._model_lock.acquire(blocking=False):
            return None  # a batch is running: queue behind it and join the next one
        try:
            if not self._queue.empty() or self._expected:
                return None  # a job queued meanwhile would otherwise wait behind this one
            if self.threads is not None and torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)  # OpenMP's thread count is per calling thread
            job = _Job(pixels, task_ids, rows=self._rows(int(pixels.shape[0]), task_ids))
            self._model_runs(job.rows)
            started = time.perf_counter()
            try:
                vectors = self._compute([job])[0]
            finally:
                self._model_runs(None)
            elapsed = time.perf_counter() - started
            self.inline_runs += 1
            self._count(job.size, job.rows, elapsed, queue_s=0.0)
        finally:
            self._model_lock.release()
        return EmbedResult(vectors, 0.0, elapsed, job.size)

    async def embed(self, pixels: Tensor, task_ids: tuple[int, ...] | None) -> EmbedResult:
        """``submit`` and await the result; cancelling the await cancels the job if not yet started."""
        future = self.submit(pixels, task_ids)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    # ---------------------------------------------------------------------------------- worker

    def _take(self, item: _Job | object) -> _Job | object:
        """An item just taken off the queue: its rows no longer count as waiting."""
        if isinstance(item, _Job):
            with self._rows_lock:
                self._queued_rows -= item.rows
        return item

    def _run(self) -> None:
        if self.threads is not None:
            # Set on the worker itself: OpenMP keeps the thread count per calling thread. On a small CPU
            # the model's parallel regions otherwise spin on the cores the event loop and decoding need.
            torch.set_num_threads(self.threads)
        if self._fixed_bound is None and self.max_queue_delay_s is not None:
            self._calibrate()
        carried: _Job | None = None
        stopping = False
        while True:
            if carried is not None:
                first: _Job | object = carried
                carried = None
            elif stopping:
                try:
                    first = self._take(self._queue.get_nowait())
                except queue.Empty:
                    return
            else:
                first = self._take(self._queue.get())
            if first is _STOP:
                stopping = True
                continue
            assert isinstance(first, _Job)
            # The model is reserved before the batch is collected: jobs that queue while an inline job
            # (``run_if_idle``) holds the model join this batch instead of the next one.
            with self._model_lock:
                batch, carried, stopped = self._collect(first)
                stopping = stopping or stopped
                if self.metrics is not None:
                    self.metrics.queue_depth.set(self._queue.qsize())
                done = self._compute_batch(batch)
            if done is not None:
                self._resolve(*done)

    def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None, bool]:
        """``first`` and what joins it (up to ``batch_limit`` images): what is queued at once, and what
        announced requests submit within ``max_wait_ms``. Also the job that did not fit (carried to the
        next batch) and whether the stop sentinel was taken."""
        batch, size = [first], first.size
        deadline = time.perf_counter() + self.max_wait_s
        while size < self.batch_limit:
            try:
                nxt = self._queue.get_nowait()  # what is already queued joins at once
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not self._expected:
                    break  # nobody else is on the way: run now
                try:
                    nxt = self._queue.get(timeout=min(remaining, _POLL_S))
                except queue.Empty:
                    continue
            self._take(nxt)
            if nxt is _STOP:
                return batch, None, True
            assert isinstance(nxt, _Job)
            if size + nxt.size > self.batch_limit:
                return batch, nxt, False
            batch.append(nxt)
            size += nxt.size
        return batch, None, False

    def _calibrate(self) -> None:
        """Before any job is taken: measure rows/s on batches of one task (the common request) of 1, 2, 4, ...
        up to ``max_batch_size`` images, and cap batches at the size that runs the most rows a second.
        Batching pays for a small CNN (its per-call overhead is shared) but can cost for a large one on a
        CPU, whose activations of many images at once no longer fit its caches."""
        size = getattr(self.model.config, "image_size", 0)
        if not size:
            return
        sizes = sorted({min(2**i, self.max_batch_size) for i in range(self.max_batch_size.bit_length() + 1)})
        rates: dict[int, float] = {}
        try:
            with self._model_lock:  # an inline job waits for it (``run_if_idle`` finds the model busy)
                for n in sizes:
                    pixels = torch.zeros((n, 3, size, size), dtype=torch.uint8)
                    job = _Job(pixels if self.normalize is not None else pixels.float(), (0,))
                    self._compute([job])  # untimed: first-call allocations, cuDNN autotuning
                    times = []
                    for _ in range(_CALIBRATION_RUNS):
                        started = time.perf_counter()
                        self._compute([job])
                        times.append(time.perf_counter() - started)
                    rates[n] = n / max(sorted(times)[len(times) // 2], 1e-9)
        except Exception:  # a model that cannot run fails the first real batch, which reports it
            log.exception("throughput calibration failed; shedding by queue delay is off until a batch runs")
            return
        self.batch_limit = max(rates, key=lambda n: (rates[n], -n))  # the fastest; of equals the smallest
        self.rows_per_second = rates[self.batch_limit]
        log.info(
            "model throughput %.0f image-task rows/s in batches of up to %d images (%s)",
            self.rows_per_second,
            self.batch_limit,
            ", ".join(f"{n}: {rate:.0f}/s" for n, rate in rates.items()),
        )

    def _observe_throughput(self, rows: int, elapsed: float) -> None:
        if elapsed <= 0 or rows <= 0:
            return
        measured = rows / elapsed
        current = self.rows_per_second
        if current is None:
            self.rows_per_second = measured
            return
        # A small batch runs fewer rows a second than the model can, so it moves the estimate in proportion
        # to its size: full batches say most, and a model whose batches stay small under load (it is slow,
        # or the machine is busy) still has its estimate follow what it does.
        weight = _EWMA * min(1.0, rows / self.batch_limit)
        self.rows_per_second = (1 - weight) * current + weight * measured

    def _compute_batch(self, jobs: list[_Job]) -> tuple[list[_Job], list[np.ndarray], float, float] | None:
        """Run the jobs not cancelled meanwhile, under the model lock: (those jobs, their vectors, start
        time, seconds), or None when none is left or the model failed (every waiting request learns it)."""
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not live:
            return None
        self._model_runs(sum(job.rows for job in live))
        started = time.perf_counter()
        try:
            outputs = self._compute(live)
        except Exception as exc:
            log.exception("batch of %d jobs failed", len(live))
            for job in live:
                job.future.set_exception(exc)
            return None
        finally:
            self._model_runs(None)
        elapsed = time.perf_counter() - started
        self._count(sum(job.size for job in live), sum(job.rows for job in live), elapsed, queue_s=None)
        return live, outputs, started, elapsed

    def _resolve(self, live: list[_Job], outputs: list[np.ndarray], started: float, elapsed: float) -> None:
        """Answer each job of a batch (outside the model lock: the next batch may start meanwhile)."""
        size = sum(job.size for job in live)
        for job, vectors in zip(live, outputs, strict=True):
            queue_s = started - job.enqueued
            if self.metrics is not None:
                self.metrics.queue_seconds.observe(queue_s)
            job.future.set_result(EmbedResult(vectors, queue_s, elapsed, size))

    def _count(self, images: int, rows: int, elapsed: float, queue_s: float | None) -> None:
        """A model call's bookkeeping, under the model lock: counters, the throughput estimate, the batch
        metrics (and the queue time of an inline job, which never queued)."""
        self.batches_run += 1
        self.images_embedded += images
        self._observe_throughput(rows, elapsed)
        if self.metrics is not None:
            self.metrics.observe_batch(images, elapsed)
            if queue_s is not None:
                self.metrics.queue_seconds.observe(queue_s)

    def _precision(self) -> AbstractContextManager[object]:
        if self._autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.inference_mode()
    def _compute(self, jobs: list[_Job]) -> list[np.ndarray]:
        # ONE model call for the whole batch, whatever task each job asked for: every job's images under
        # its own tasks are rows of one mixed-task batch (``embed_pairs``), so concurrent requests for
        # different tasks share the call (and the task-independent prefix runs once per image).
        device = self.model.device
        # uint8 crosses to the device (4x fewer bytes than float) and is normalised there.
        pixels = jobs[0].pixels if len(jobs) == 1 else torch.cat([job.pixels for job in jobs])  # (N, 3, S, S)
        pixels = pixels.to(device, non_blocking=True)
        if not pixels.is_floating_point():
            assert self.normalize is not None
            pixels = self.normalize(pixels)
        if self.cuda:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        image_index: list[int] = []
        task_ids: list[int] = []
        shapes: list[tuple[int, int]] = []
        first_image = 0
        for job in jobs:
            wanted = range(self.num_tasks) if job.task_ids is None else job.task_ids
            for image in range(first_image, first_image + job.size):  # image-major: reshapes to (n, K)
                image_index.extend([image] * len(wanted))
                task_ids.extend(wanted)
            shapes.append((job.size, len(wanted)))
            first_image += job.size
        with self._precision():
            embedded = self.model.embed_pairs(pixels, image_index, task_ids)  # (R, D) on the device
        vectors = embedded.float().cpu().numpy()  # one host copy
        outputs, row = [], 0
        for images, k in shapes:
            outputs.append(vectors[row : row + images * k].reshape(images, k, -1))  # (R, D) -> (n, K, D)
            row += images * k
        return outputs
