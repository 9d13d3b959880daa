"""Searches running concurrently with adds, removes and saves never see half of a write."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from tests.index.conftest import BACKEND_CASES, DIM, TASKS, BackendCase, StoreFactory, unit_vectors

BATCH = 6
BATCHES = 40
CASES = [c for c in BACKEND_CASES if c.name in ("faiss-flat", "faiss-flat-torch", "faiss-hnsw")]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_searches_never_see_torn_writes(
    case: BackendCase, make_store_for: Callable[[BackendCase], StoreFactory]
) -> None:
    store = make_store_for(case)()
    rng = np.random.default_rng(0)
    # Batch b: BATCH ids that all share one direction; a search for that direction with k=BATCH returns
    # the whole batch (score 1, ties) when it is stored and none of it otherwise, so any other number of
    # its ids in the answer is a torn read.
    directions = unit_vectors(rng, BATCHES)
    store.add(np.arange(10_000, 10_050, dtype=np.int64), {t: unit_vectors(rng, 50) for t in TASKS})
    errors: list[str] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for b in range(BATCHES):
                ids = np.arange(b * BATCH, (b + 1) * BATCH, dtype=np.int64)
                store.add(ids, {t: np.repeat(directions[b : b + 1], BATCH, axis=0) for t in TASKS})
                if b % 3 == 2:
                    store.remove(np.arange((b - 2) * BATCH, (b - 1) * BATCH))
                if b % 10 == 9:
                    store.save()
        finally:
            done.set()

    def reader() -> None:
        local = np.random.default_rng(threading.get_ident() % 2**32)
        while not done.is_set():
            b = int(local.integers(BATCHES))
            task = TASKS[int(local.integers(len(TASKS)))]
            result = store.search(task, directions[b : b + 1], BATCH)
            seen = int(np.isin(result.ids[0], np.arange(b * BATCH, (b + 1) * BATCH)).sum())
            if seen not in (0, BATCH):
                errors.append(f"batch {b} under {task}: {seen} of {BATCH} ids visible")
            # Two count calls are not one snapshot, but each sees whole batches only.
            count = store.count(task)
            if count % BATCH != 50 % BATCH:
                errors.append(f"count {count} of {task} is not 50 + whole batches")

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors[:5]
    assert store.count("Smiling") == 50 + BATCH * (BATCHES - BATCHES // 3)
    assert store.dim == DIM
