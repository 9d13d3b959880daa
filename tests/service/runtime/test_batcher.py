"""The dynamic batcher with a real tiny model: same vectors as a direct call, concurrent jobs share a
model call, a full queue refuses at once, stop finishes queued work."""

from __future__ import annotations

import concurrent.futures
import threading
import time
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
    # no shedding by delay, so no calibration: batches of up to max_batch_size, whatever the machine measures
    b = Batcher(
        run.model,
        max_batch_size=16,
        max_wait_ms=50,
        max_queue=64,
        metrics=ServiceMetrics(),
        max_queue_delay_s=None,
    )
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
        with batcher.expecting():  # as a request does while it decodes its image
            barrier.wait()
        return batcher.submit(images(1, seed=i), (i % 4,)).result(timeout=30).batch_size

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(one, range(8)))
    assert max(sizes) > 1
    # Eight jobs released together within the 50 ms window: far fewer model batches than jobs (one
    # batch per job would be 8), and every image counted once across the batches.
    assert batcher.batches_run <= 4
    assert batcher.images_embedded == 8


def test_a_lone_job_runs_at_once_and_an_announced_one_is_waited_for(run: LoadedRun) -> None:
    b = Batcher(run.model, max_batch_size=8, max_wait_ms=5000, max_queue=16, max_queue_delay_s=None)
    b.start()
    try:
        lone = b.submit(images(1), (0,)).result(timeout=30)
        assert lone.batch_size == 1 and lone.queue_s < 2.5  # nobody announced: no 5 s wait for company
        with b.expecting():  # another request is still decoding its image
            first = b.submit(images(1), (0,))
            threading.Event().wait(0.05)
            second = b.submit(images(1), (1,))
        assert first.result(timeout=30).batch_size == second.result(timeout=30).batch_size == 2
    finally:
        b.stop()


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
    """Hand the worker a big job (hundreds of ms on this model) and wait until it has taken it. A batcher
    that sheds by measured delay refuses what queues behind it: tests of queueing turn that off."""
    future = b.submit(images(3000), None)
    while b.queue_depth():
        threading.Event().wait(0.001)
    return future  # type: ignore[return-value]


def test_jobs_for_different_tasks_share_one_model_call(run: LoadedRun) -> None:
    b = Batcher(run.model, max_batch_size=16, max_wait_ms=0, max_queue=64, max_queue_delay_s=None)
    b.start()
    stem_calls: list[int] = []
    hook = run.model.trunk(0).stem.register_forward_hook(lambda _m, a, _o: stem_calls.append(a[0].shape[0]))
    try:
        occupy(b)
        wanted: list[tuple[int, ...] | None] = [(0,), (3,), (1, 2), None, (2,), (0, 0)]
        sizes = [1, 2, 1, 1, 3, 1]
        jobs = [images(n, seed=i) for i, n in enumerate(sizes)]
        futures = [b.submit(pixels, tasks) for pixels, tasks in zip(jobs, wanted, strict=True)]
        results = [f.result(timeout=60) for f in futures]
    finally:
        hook.remove()
        b.stop()
    # The six jobs queued behind the big one ran as one batch: one stem call on their 9 images.
    assert stem_calls[-1] == sum(sizes) and {r.batch_size for r in results} == {sum(sizes)}
    with torch.inference_mode():
        for pixels, tasks, result in zip(jobs, wanted, results, strict=True):
            expected = run.model.embed_tasks(pixels, tasks).numpy()
            assert result.vectors.shape == expected.shape
            np.testing.assert_allclose(result.vectors, expected, atol=1e-5)


def test_full_queue_refuses_immediately(run: LoadedRun) -> None:
    b = Batcher(run.model, max_batch_size=1, max_wait_ms=0, max_queue=2, max_queue_delay_s=None)
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
    b = Batcher(run.model, max_batch_size=4, max_wait_ms=20, max_queue=64, max_queue_delay_s=None)
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


def uint8_images(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)


def test_uint8_pixels_are_normalised_where_the_model_is(run: LoadedRun) -> None:
    """A model whose parameters are float64 stands in for one on another device: request tensors are made
    on the host as uint8, so every tensor must be moved (and cast) before it reaches a module. Each
    module's inputs are recorded; all must be where the parameters are, as what they are."""
    model = run.model.__class__(run.model.config)
    model.load_state_dict(run.model.state_dict())
    model = model.double().eval()
    seen: list[tuple[torch.device, torch.dtype]] = []

    def record(_module: torch.nn.Module, args: tuple[object, ...]) -> None:
        seen.extend((a.device, a.dtype) for a in args if isinstance(a, torch.Tensor))

    handles = [m.register_forward_pre_hook(record) for m in model.modules()]
    normalised: list[torch.Tensor] = []

    def normalize(pixels: torch.Tensor) -> torch.Tensor:
        normalised.append(pixels)
        return run.preprocess.normalize(pixels)

    b = Batcher(model, max_batch_size=8, max_wait_ms=1, max_queue=8, normalize=normalize)
    b.start()
    try:
        pixels = uint8_images(3)
        got = b.submit(pixels, (1, 3)).result(timeout=30).vectors
    finally:
        b.stop()
        for handle in handles:
            handle.remove()
    assert normalised and all(p.dtype == torch.uint8 and p.device == model.device for p in normalised)
    floats = {dtype for _, dtype in seen if dtype.is_floating_point}
    assert floats == {torch.float64}, floats
    assert {device for device, _ in seen} == {model.device}
    with torch.inference_mode():
        direct = model.embed_tasks(run.preprocess.normalize(pixels).double(), (1, 3)).numpy()
    np.testing.assert_allclose(got, direct, atol=1e-6)


def test_queued_rows_past_the_bound_are_refused_and_accounted(run: LoadedRun) -> None:
    b = Batcher(run.model, max_batch_size=1, max_wait_ms=0, max_queue=64, max_queued_rows=6)
    b.start()
    try:
        busy = occupy(b)  # taken by the worker: an empty queue takes any job, however large
        first = b.submit(images(1), (0, 1, 2))  # 3 rows
        second = b.submit(images(1), (0, 1, 2))  # 6 rows: at the bound, still taken
        with pytest.raises(QueueFull, match="image-task rows"):
            b.submit(images(1), (0,))  # a 7th row would wait past the bound
        assert b.queued_rows == 6 and not busy.done()
        for future in (first, second):
            assert future.result(timeout=60).vectors.shape == (1, 3, 16)
        assert b.queued_rows == 0
        assert b.submit(images(1), (0,)).result(timeout=30).vectors.shape == (1, 1, 16)
    finally:
        b.stop()


def test_admitted_requests_count_before_they_queue_and_until_they_end(run: LoadedRun) -> None:
    # At high concurrency most requests in flight wait for a worker thread or decode, where the queue
    # cannot see them: admitted before their bodies are read, they count against the bound until they end.
    b = Batcher(run.model, max_batch_size=1, max_wait_ms=0, max_queue=64, max_queued_rows=4)
    b.start()
    try:
        with b.admitted(3, (0, 1, 2)):  # 9 rows: nothing is ahead, so admitted however large
            with pytest.raises(QueueFull, match="image-task rows behind"), b.admitted(1, (0,)):
                pass  # behind 9 rows that are on their way, none queued yet
            assert b.admitted_rows == 9 and b.queued_rows == 0
        assert b.admitted_rows == 0
        with b.admitted(1, (0, 1)), b.admitted(1, (0, 1)):  # 2 + 2 rows: at the bound, both admitted
            with pytest.raises(QueueFull), b.admitted(1, (0,)):
                pass
            assert b.submit(images(1), (0, 1)).result(timeout=60).vectors.shape == (1, 2, 16)
            assert b.admitted_rows == 4  # served by the model, still ranking: counted until the end
        with pytest.raises(RuntimeError), b.admitted(1, None):
            raise RuntimeError("a request that fails is released too")
        assert b.admitted_rows == 0
        busy = occupy(b)
        b.submit(images(1), (0, 1, 2, 3))  # 4 queued rows from a caller that was not admitted
        with pytest.raises(QueueFull), b.admitted(1, (0,)):
            pass  # the queue counts when it is more than what is admitted
        busy.result(timeout=60)
    finally:
        b.stop()


def test_the_batch_in_the_model_counts_against_the_measured_bound(run: LoadedRun) -> None:
    # A slow model's full batch is most of a new job's wait: the rows it has left count as well as the
    # queued ones, or a busy model would take a batch's worth of jobs that each wait for it to finish.
    b = Batcher(run.model, max_batch_size=8, max_wait_ms=0, max_queue=64, max_queue_delay_s=0.02)
    b.start()
    try:
        b.submit(images(1), (0,)).result(timeout=60)  # served after the worker measured itself
        bound = b.max_queued_rows
        assert bound is not None
        busy = b.submit(images(3000), None)  # 3000 x 4 rows: many times what it may queue
        while (b.queued_rows or not b.rows_ahead) and not busy.done():
            threading.Event().wait(0.0001)  # until the worker has it in the model
        assert b.queued_rows == 0 and b.rows_ahead > bound + 2
        first = b.submit(images(1), (0,))  # an empty queue takes any job, however large
        with pytest.raises(QueueFull, match="image-task rows behind"):
            b.check_room(1, (0,))  # what a request asks before it decodes its image
        with pytest.raises(QueueFull, match="image-task rows behind"):
            b.submit(images(1), (0,))  # 2 queued rows are within the bound; the batch ahead is not
        assert not busy.done()
        assert first.result(timeout=60).vectors.shape == (1, 1, 16)
        busy.result(timeout=60)
        assert b.rows_ahead == 0
    finally:
        b.stop()


def test_the_throughput_estimate_follows_small_batches(run: LoadedRun) -> None:
    # A model whose batches stay small under load (slow, or on a busy machine) would otherwise keep the
    # estimate of an idle full batch and queue more than it can get through.
    b = Batcher(run.model, max_batch_size=8, max_wait_ms=0, max_queue=64, max_queue_delay_s=0.5)
    b.start()
    try:
        b.submit(images(1), (0,)).result(timeout=60)
        b.rows_per_second = 1e12  # far above anything the model does
        for i in range(60):
            b.submit(images(1, seed=i), (0,)).result(timeout=60)  # one row a batch: weight 1/8 of a full one
        assert b.rows_per_second is not None and b.rows_per_second < 0.5e12
        assert b.rows_per_second > 0.01e12  # ...a small batch moves it less than a full batch would
    finally:
        b.stop()


@pytest.mark.parametrize(("cost", "limit"), [("per_call", 4), ("grows_with_batch", 1)])
def test_batches_are_capped_at_the_size_the_model_runs_fastest(run: LoadedRun, cost: str, limit: int) -> None:
    # A forward hook on the stem stands in for where a model's time goes: a fixed cost per call (a small
    # CNN's overhead, which a batch shares) or a cost per image that grows with the batch (a large CNN on
    # a CPU whose caches a big batch overflows).
    def slow(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], _o: torch.Tensor) -> None:
        n = args[0].shape[0]
        time.sleep(0.004 if cost == "per_call" else 0.01 * n * n)

    calls: list[int] = []
    hooks = [
        run.model.trunk(0).stem.register_forward_hook(slow),
        run.model.trunk(0).stem.register_forward_hook(lambda _m, a, _o: calls.append(a[0].shape[0])),
    ]
    b = Batcher(run.model, max_batch_size=4, max_wait_ms=0, max_queue=64, max_queue_delay_s=5.0)
    b.start()
    try:
        b.submit(images(1), (0,)).result(timeout=60)  # served after the worker measured itself
        assert b.batch_limit == limit and b.rows_per_second is not None
        calls.clear()
        busy = b.submit(images(1), (0,))  # the worker runs it while the next ones queue
        futures = [b.submit(images(1, seed=i), (0,)) for i in range(12)]
        for future in [busy, *futures]:
            assert future.result(timeout=60).vectors.shape == (1, 1, 16)
        assert max(calls) <= limit
    finally:
        for hook in hooks:
            hook.remove()
        b.stop()


def test_bound_derives_from_measured_throughput(run: LoadedRun) -> None:
    b = Batcher(run.model, max_batch_size=8, max_wait_ms=1, max_queue=64, max_queue_delay_s=0.5)
    b.start()
    try:
        b.submit(images(1), (0,)).result(timeout=60)  # served after the worker measured itself
        rate = b.rows_per_second
        assert rate is not None and rate > 0
        assert b.max_queued_rows == max(b.batch_limit, int(rate * 0.5))
        b.max_queued_rows = 5  # fixed (the setting) overrides the measurement
        assert b.max_queued_rows == 5
    finally:
        b.stop()
    off = Batcher(run.model, max_queue_delay_s=None)
    assert off.max_queued_rows is None  # shedding by delay off: only max_queue bounds the queue


def test_an_idle_model_runs_a_lone_job_on_the_callers_thread(run: LoadedRun) -> None:
    batcher = Batcher(run.model, max_batch_size=16, max_queue=64, max_queue_delay_s=None)  # no calibration
    batcher.start()
    threads: list[str] = []
    hook = run.model.trunk(0).stem.register_forward_hook(
        lambda _m, _a, _o: threads.append(threading.current_thread().name)
    )
    pixels = images(2, seed=5)
    try:
        done = batcher.run_if_idle(pixels, (3, 1))
    finally:
        hook.remove()
    assert done is not None and threads == [threading.current_thread().name]
    assert (batcher.inline_runs, batcher.batches_run, batcher.images_embedded) == (1, 1, 2)
    assert done.queue_s == 0.0 and done.batch_size == 2 and done.embed_s > 0
    queued = batcher.submit(pixels, (3, 1)).result(timeout=30)  # the worker's path: the same vectors
    np.testing.assert_allclose(done.vectors, queued.vectors, atol=1e-5)
    batcher.stop()
    with torch.inference_mode():
        np.testing.assert_allclose(done.vectors, run.model.embed_tasks(pixels, (3, 1)).numpy(), atol=1e-5)


def test_a_busy_model_or_queued_or_announced_work_leaves_the_job_to_the_worker(run: LoadedRun) -> None:
    b = Batcher(run.model, max_batch_size=4, max_wait_ms=0, max_queue=64)
    b.start()
    try:
        busy = occupy(b)
        while not b.busy and not busy.done():
            threading.Event().wait(0.001)
        assert b.run_if_idle(images(1), (0,)) is None  # the worker holds the model
        behind = b.submit(images(1), (0,))
        assert b.run_if_idle(images(1), (0,)) is None  # still None: a job is queued
        busy.result(timeout=60)
        behind.result(timeout=60)
        with b.expecting():  # another request is preparing its pixels: batch with it on the worker
            assert b.run_if_idle(images(1), (0,)) is None
        assert b.inline_runs == 0
        assert b.run_if_idle(images(1), (0,)) is not None and b.inline_runs == 1
    finally:
        b.stop()
    off = Batcher(run.model, max_batch_size=4, max_queue=4, run_idle_inline=False)
    off.start()
    try:
        assert off.run_if_idle(images(1), (0,)) is None
    finally:
        off.stop()


def test_run_if_idle_checks_as_submit_does(run: LoadedRun, batcher: Batcher) -> None:
    with pytest.raises(ValueError):
        batcher.run_if_idle(images(1), (9,))
    with pytest.raises(ValueError):
        batcher.run_if_idle(torch.zeros((0, 3, 32, 32)), (0,))
    batcher.stop()
    with pytest.raises(BatcherStopped):
        batcher.run_if_idle(images(1), (0,))


def test_jobs_queued_behind_an_inline_run_form_one_batch(run: LoadedRun) -> None:
    b = Batcher(run.model, max_batch_size=16, max_wait_ms=0, max_queue=64, max_queue_delay_s=None)
    b.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            inline = pool.submit(b.run_if_idle, images(3000), None)  # hundreds of ms on the caller's thread
            while not b.busy and not inline.done():
                threading.Event().wait(0.001)
            queued = [b.submit(images(1), (0,))]
            while b.queue_depth():  # the worker has taken it and waits for the model
                threading.Event().wait(0.001)
            queued += [b.submit(images(1, seed=i), (i,)) for i in (1, 2)]
            assert inline.result(timeout=60) is not None
        assert [f.result(timeout=60).batch_size for f in queued] == [3, 3, 3]
        assert (b.inline_runs, b.batches_run) == (1, 2)
    finally:
        b.stop()
