"""The dynamic batcher with a real tiny model: same vectors as a direct call, concurrent jobs share a
model call, a full queue refuses at once, stop finishes queued work."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from model.run import LoadedRun, load_run
from service.runtime.batcher import Batcher, BatcherStopped, QueueFull
from service.telemetry import ServiceMetrics


@pytest.fixture(scope="module")
def run(run_dir: Path) -> LoadedRun:
    return load_run(run_dir)


@pytest.fixture
def batcher(run: LoadedRun) -> Iterator[Batcher]:
    b = Batcher(run.model, max_batch_size=16, max_wait_ms=50, max_queue=64, metrics=ServiceMetrics())
    b.start()
    yield b
    b.stop()


def images(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, 32, 32), generator=generator) * 2 - 1


def test_results_match_direct_model_calls(run: LoadedRun, batcher: Batcher) -> None:
    pixels = images(3)
    chosen = batcher.submit(pixels, (2, 0)).result(timeout=30)
    every = batcher.submit(pixels, None).result(timeout=30)
    with torch.inference_mode():
        direct_all = run.model.embed_tasks(pixels).numpy()
        direct_two = run.model.embed(pixels.repeat_interleave(2, 0), torch.tensor([2, 0] * 3)).numpy()
    assert chosen.vectors.shape == (3, 2, 16)
    np.testing.assert_allclose(chosen.vectors.reshape(6, 16), direct_two, atol=1e-5)
    np.testing.assert_allclose(every.vectors, direct_all, atol=1e-5)
    np.testing.assert_allclose(every.vectors[:, 2], chosen.vectors[:, 0], atol=1e-5)


def test_concurrent_jobs_are_batched_together(batcher: Batcher) -> None:
    barrier = threading.Barrier(8)

    def one(i: int) -> int:
        barrier.wait()
        return batcher.submit(images(1, seed=i), (i % 4,)).result(timeout=30).batch_size

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(one, range(8)))
    assert max(sizes) > 1
    # Eight jobs released together within the 50 ms window: far fewer model batches than jobs (one
    # batch per job would be 8), and every image counted once across the batches.
    assert batcher.batches_run <= 4
    assert batcher.images_embedded == 8


def test_batching_off_runs_one_job_per_call(run: LoadedRun) -> None:
    b = Batcher(run.model, max_batch_size=1, max_wait_ms=0, max_queue=16)
    b.start()
    try:
        futures = [b.submit(images(1, seed=i), (0,)) for i in range(5)]
        assert {f.result(timeout=30).batch_size for f in futures} == {1}
        assert b.batches_run == 5
    finally:
        b.stop()


def test_large_job_is_not_split_and_mixed_jobs_all_answer(batcher: Batcher) -> None:
    big = batcher.submit(images(40), None)
    small = batcher.submit(images(2), (1,))
    assert big.result(timeout=60).vectors.shape == (40, 4, 16)
    assert small.result(timeout=60).vectors.shape == (2, 1, 16)


def occupy(b: Batcher) -> concurrent.futures.Future[object]:
    """Hand the worker a big job (hundreds of ms on this model) and wait until it has taken it."""
    future = b.submit(images(3000), None)
    while b.queue_depth():
        threading.Event().wait(0.001)
    return future  # type: ignore[return-value]


def test_full_queue_refuses_immediately(run: LoadedRun) -> None:
    b = Batcher(run.model, max_batch_size=1, max_wait_ms=0, max_queue=2)
    b.start()
    try:
        busy = occupy(b)
        queued = [b.submit(images(1), (0,)) for _ in range(2)]
        with pytest.raises(QueueFull):
            b.submit(images(1), (0,))
        assert not busy.done()  # the refusal did not wait for the worker
        for future in queued:
            assert future.result(timeout=60).vectors.shape == (1, 1, 16)
    finally:
        b.stop()


def test_stop_finishes_queued_jobs_then_refuses(run: LoadedRun) -> None:
    b = Batcher(run.model, max_batch_size=4, max_wait_ms=1, max_queue=64)
    b.start()
    futures = [b.submit(images(1, seed=i), (i % 4,)) for i in range(12)]
    b.stop()
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(BatcherStopped):
        b.submit(images(1), (0,))


def test_cancelled_jobs_are_skipped(run: LoadedRun) -> None:
    b = Batcher(run.model, max_batch_size=4, max_wait_ms=20, max_queue=64)
    b.start()
    try:
        occupy(b)
        futures = [b.submit(images(1, seed=i), (0,)) for i in range(3)]
        assert futures[1].cancel()
        assert futures[0].result(timeout=60).batch_size == 2
        assert futures[2].result(timeout=60).batch_size == 2
        assert futures[1].cancelled()
    finally:
        b.stop()


def test_rejects_bad_requests(batcher: Batcher) -> None:
    with pytest.raises(ValueError):
        batcher.submit(images(1), (9,))
    with pytest.raises(ValueError):
        batcher.submit(torch.zeros((0, 3, 32, 32)), None)
