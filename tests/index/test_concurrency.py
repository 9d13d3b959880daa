"""Reads running concurrently with adds, removes, re-adds and saves see whole writes, in order.

One writer thread applies a scripted sequence of writes to a store with several tasks; the id set after
write j is the state S_j (S_0: the initial gallery). Reader threads meanwhile read every task, in varying
orders: searches whose ``k`` exceeds the gallery (so that a search returns the whole id set the task holds),
``ids`` and ``count``. With every write atomic across the tasks and every read atomic (the stores'
reader-writer lock), each read must show

- exactly some state S_j: no id that was never added, none whose removal was acknowledged, no half of a
  write (a search's scores must also be its ids' own vectors' scores on exact backends);
- a state no older than the last write acknowledged before the read began, and no newer than the last
  write begun before it ended;
- per reader, states that never go back: once one task's read has shown a write, a later read of any
  task shows it too (the cross-task check; a write that lands in one task's index before another's fails
  it when the reader reads the tasks in the writer's order).

Without the write lock these fail within a few writes (checked by making ``RWLock.write`` a no-op).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from index.store import VectorStore
from tests.index.conftest import BACKEND_CASES, DIM, BackendCase, MakeStore, unit_vectors

TASKS = ["Smiling", "Eyeglasses", "Bald", "Wearing_Hat"]
INITIAL = 50  # ≥ IVF-PQ's training minimum, and < 78 so that it trains one list (every search probes all)
ID_SPACE = 1000
K = 600  # more than the store ever holds: a search returns every stored id
READERS = 4
SAVE_EVERY = 25
SCORE_TOL = 1e-4
WRITES = {"milvus": 60}  # per backend; default 150 (Milvus Lite answers each call over gRPC)


@dataclass
class Script:
    """The writes, the state after each, and the vectors every id always gets (so scores are checkable)."""

    writes: list[tuple[str, np.ndarray]]
    states: list[frozenset[int]]
    vectors: dict[str, np.ndarray]  # task -> (ID_SPACE, DIM), row = id
    by_state: dict[frozenset[int], list[int]] = field(default_factory=dict)
    by_size: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        by_state: defaultdict[frozenset[int], list[int]] = defaultdict(list)
        by_size: defaultdict[int, list[int]] = defaultdict(list)
        for j, state in enumerate(self.states):
            by_state[state].append(j)
            by_size[len(state)].append(j)
        self.by_state, self.by_size = dict(by_state), dict(by_size)


def make_script(writes: int, seed: int = 0) -> Script:
    rng = np.random.default_rng(seed)
    vectors = {task: unit_vectors(rng, ID_SPACE) for task in TASKS}
    live = set(range(INITIAL))
    removed: list[int] = []
    next_id = INITIAL
    script: list[tuple[str, np.ndarray]] = []
    states = [frozenset(live)]
    for _ in range(writes):
        roll = rng.random()
        if roll < 0.45 or len(live) < 20:  # fresh ids
            ids = list(range(next_id, next_id + int(rng.integers(1, 8))))
            next_id += len(ids)
            live.update(ids)
            script.append(("add", np.array(ids, dtype=np.int64)))
        elif roll < 0.8 or not removed:  # live ids from anywhere, sometimes with one never added
            ids = rng.choice(sorted(live), size=int(rng.integers(1, 6)), replace=False).tolist()
            live.difference_update(ids)
            removed += ids
            extra = [ID_SPACE - 1] if rng.random() < 0.2 else []
            script.append(("remove", np.array(ids + extra, dtype=np.int64)))
        else:  # removed ids come back (HNSW then rebuilds its graphs inside the add)
            ids = removed[: int(rng.integers(1, 5))]
            del removed[: len(ids)]
            live.update(ids)
            script.append(("add", np.array(ids, dtype=np.int64)))
        states.append(frozenset(live))
    assert next_id < ID_SPACE - 1 and max(len(s) for s in states) < K
    return Script(script, states, vectors)


@dataclass
class Progress:
    begun: int = 0  # the write in progress or last begun
    acked: int = 0  # the last write that returned
    done: threading.Event = field(default_factory=threading.Event)
    # Per reader (one slot each, so that no update is lost): reads done, and whether it stopped reading.
    reads: list[int] = field(default_factory=lambda: [0] * READERS)
    stopped: list[bool] = field(default_factory=lambda: [False] * READERS)

    def wait_for_reads(self, n: int, timeout: float = 5.0) -> None:
        """Pace the writer: let the readers finish ``n`` more reads (the writer lock favours writers)."""
        target = sum(self.reads) + n
        deadline = time.monotonic() + timeout
        while sum(self.reads) < target and not all(self.stopped) and time.monotonic() < deadline:
            time.sleep(1e-4)


@pytest.fixture
def fine_grained_switching() -> Iterator[None]:
    """Switch threads every 10 µs instead of 5 ms, so that readers run between the steps of a write."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def describe(observed: frozenset[int], script: Script, lo: int, hi: int) -> str:
    closest = min(range(min(lo, hi), hi + 1), key=lambda j: len(observed ^ script.states[j]))
    extra = sorted(observed - script.states[closest])[:8]
    missing = sorted(script.states[closest] - observed)[:8]
    return f"closest allowed state S_{closest}: extra ids {extra}, missing ids {missing}"


def read_loop(
    store: VectorStore, case: BackendCase, script: Script, progress: Progress, seed: int
) -> tuple[list[str], int, set[int]]:
    """One reader: (errors, reads done, states seen)."""
    rng = np.random.default_rng(seed)
    errors: list[str] = []
    seen: set[int] = set()
    last = reads = 0
    while not progress.done.is_set() and len(errors) < 5:
        order = list(TASKS) if rng.random() < 0.6 else list(rng.permutation(TASKS))
        for task in order:
            what = ("search", "search", "ids", "count")[int(rng.integers(4))]
            lo = progress.acked
            if what == "search":
                query = unit_vectors(rng, 1)
                result = store.search(task, query, K)
                ids = result.ids[0][result.ids[0] >= 0]
                observed = frozenset(ids.tolist())
                if len(observed) != len(ids):
                    errors.append(f"search of {task}: an id returned twice")
                if case.exact and len(ids) and np.isin(ids, np.arange(ID_SPACE)).all():
                    want = script.vectors[task][ids] @ query[0]
                    wrong = np.abs(result.scores[0][: len(ids)] - want) > SCORE_TOL
                    if wrong.any():
                        errors.append(f"search of {task}: ids {ids[wrong][:5].tolist()} have others' scores")
                candidates = script.by_state.get(observed, [])
            elif what == "ids":
                observed = frozenset(store.ids(task).tolist())
                candidates = script.by_state.get(observed, [])
            else:
                count = store.count(task)
                observed = frozenset()
                candidates = script.by_size.get(count, [])
            hi = progress.begun
            reads += 1
            progress.reads[seed] += 1
            allowed = [j for j in candidates if max(last, lo) <= j <= hi]
            if allowed:
                last = allowed[0]  # the earliest consistent state keeps the most later reads possible
                seen.add(last)
                continue
            where = f"{what} of {task} during writes {lo}..{hi}, after this reader saw S_{last}"
            if what == "count":
                errors.append(f"{where}: count {count} is no allowed state's size")
            elif candidates:
                errors.append(f"{where}: saw the state of write(s) {candidates[:5]} only, out of order")
            else:
                errors.append(f"{where}: no state at all; {describe(observed, script, max(last, lo), hi)}")
    return errors, reads, seen


@pytest.mark.usefixtures("fine_grained_switching")
@pytest.mark.parametrize("case", BACKEND_CASES, ids=[c.name for c in BACKEND_CASES])
def test_reads_see_whole_writes_in_order(case: BackendCase, make_store_for: MakeStore) -> None:
    script = make_script(WRITES.get(case.backend, 150))
    store = make_store_for(case, TASKS)()
    initial = np.array(sorted(script.states[0]), dtype=np.int64)
    store.add(initial, {task: script.vectors[task][initial] for task in TASKS})
    progress = Progress()
    outcomes: list[tuple[list[str], int, set[int]]] = []
    writer_errors: list[str] = []

    def writer() -> None:
        try:
            for j, (kind, ids) in enumerate(script.writes, start=1):
                progress.begun = j
                if kind == "add":
                    store.add(ids, {task: script.vectors[task][ids] for task in TASKS})
                else:
                    store.remove(ids)
                progress.acked = j
                if j % SAVE_EVERY == 0:
                    store.save()
                progress.wait_for_reads(READERS)
        except BaseException as e:
            writer_errors.append(repr(e))
        finally:
            progress.done.set()

    def reader(seed: int) -> None:
        try:
            outcomes.append(read_loop(store, case, script, progress, seed))
        except BaseException as e:
            outcomes.append(([f"reader {seed} raised {e!r}"], 0, set()))
        finally:
            progress.stopped[seed] = True  # a reader that gave up no longer paces the writer

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(READERS)]
    threads.append(threading.Thread(target=writer))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hangs"
    assert not writer_errors, writer_errors
    errors = [error for outcome in outcomes for error in outcome[0]]
    assert not errors, errors[:5]
    assert len(outcomes) == READERS
    # The check only means something if the reads really interleaved with the writes.
    assert sum(reads for _, reads, _ in outcomes) > 2 * len(script.writes)
    assert len(set().union(*(seen for _, _, seen in outcomes))) > len(script.writes) // 4
    final = np.array(sorted(script.states[-1]), dtype=np.int64)
    for task in TASKS:
        np.testing.assert_array_equal(store.ids(task), final)
    assert store.dim == DIM


def test_faiss_limits_openmp_threads_in_every_calling_thread(make_store_for: MakeStore) -> None:
    """OpenMP keeps its thread count per thread: a request thread that searches must get the store's
    ``omp_threads`` too, not one OpenMP thread per core (which made concurrent searches far slower)."""
    import faiss

    flat = next(case for case in BACKEND_CASES if case.name == "faiss-flat")
    store = make_store_for(flat)()
    store.add(
        np.arange(20, dtype=np.int64), {t: unit_vectors(np.random.default_rng(0), 20) for t in store.tasks()}
    )
    seen: list[int] = []

    def request() -> None:
        store.search(store.tasks()[0], unit_vectors(np.random.default_rng(1), 1), 3)
        seen.append(faiss.omp_get_max_threads())

    thread = threading.Thread(target=request)
    thread.start()
    thread.join(timeout=30)
    assert seen == [1]
