"""The replicas' write protocol (``index.replica_writes``) over a real PostgreSQL and a vector store.

Two replicas are two ``PostgresMetadata`` handles on one database sharing one store object (a faiss flat
store stands in for the Milvus server every replica reaches: the protocol only uses the store contract).
A crash is the state it leaves, written step by step: a pending row with its vectors in some tasks, all
tasks or none; a row deleted without its vectors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from index import replica_writes
from index.store import VectorStore, open_store
from tests.index.conftest import DIM, MODEL_HASH, TASKS, unit_vectors
from tests.index.test_metadata_contract import item

pytestmark = pytest.mark.cluster


@pytest.fixture
def replicas(postgres_url: str) -> Iterator[list]:
    from index.postgres_metadata import PostgresMetadata

    handles = [PostgresMetadata(postgres_url, create=True) for _ in range(2)]
    yield handles
    for handle in handles:
        handle.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[VectorStore]:
    store = open_store("faiss", tmp_path / "store", tasks=TASKS, dim=DIM, model_hash=MODEL_HASH, options={})
    yield store
    store.close()


def vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([unit_vectors(rng, n) for _ in TASKS], axis=1)  # (n, T, D)


def test_add_through_one_replica_is_seen_by_the_other_and_remove_is_rows_first(replicas, store) -> None:
    a, b = replicas
    ids, new = replica_writes.add(a, store, TASKS, [item(1), item(2)], vectors(2))
    assert new == [True, True] and b.ids().tolist() == ids
    for task in TASKS:
        assert store.ids(task).tolist() == ids
    again, again_new = replica_writes.add(b, store, TASKS, [item(2), item(3)], vectors(2, seed=1))
    assert again[0] == ids[1] and again_new == [False, True]
    assert replica_writes.remove(b, store, [ids[0]]) == 1
    assert a.get([ids[0]]) == {} and ids[0] not in store.ids(TASKS[0])
    assert a.pending() == [] and a.count() == 2


def test_repair_finishes_rolls_back_and_leaves_adds_in_flight(replicas, store) -> None:
    a, b = replicas
    # Crashed adds: one after its vectors, one before them. (Vectors in some tasks only, which a Milvus
    # insert cut short leaves, cannot be written through the store contract; repair treats any task
    # missing an id as that id missing.)
    (done, nothing), _ = a.add([item(1), item(3)], pending=True)
    store.add(np.array([done]), {task: vectors(1)[:, j] for j, task in enumerate(TASKS)})
    (deleted,), _ = replica_writes.add(a, store, TASKS, [item(4)], vectors(1))
    a.remove([deleted])  # a delete that crashed after its row
    time.sleep(0.3)
    (young,), _ = a.add([item(5)], pending=True)  # an add in flight elsewhere: younger than the limit
    assert [r.id for r in b.pending(older_than_s=0.2)] == [done, nothing]
    report = replica_writes.repair(b, store, TASKS, older_than_s=0.2)
    assert (report.committed, report.rolled_back, report.orphans) == ([done], [nothing], [deleted])
    assert len(report.describe()) == 3
    assert b.ids().tolist() == [done] and [r.id for r in b.pending()] == [young]
    for task in TASKS:
        assert store.ids(task).tolist() == [done]
    assert replica_writes.repair(b, store, TASKS, older_than_s=0.2).describe() == []


def test_a_slow_add_rolled_back_by_a_repair_keeps_nothing(replicas, store) -> None:
    a, b = replicas
    ids, _ = a.add([item(1), item(2)], pending=True)
    replica_writes.repair(b, store, TASKS, older_than_s=0)  # b thinks a crashed
    with pytest.raises(replica_writes.ReplicaWriteError, match="rolled back by a repair pass"):
        replica_writes.store_vectors(a, store, TASKS, np.array(ids), vectors(2))
    assert store.count(TASKS[0]) == 0 and a.count() == 0 and a.pending() == []


def test_a_duplicate_of_an_add_in_flight_elsewhere_waits_for_it(replicas, store) -> None:
    a, b = replicas
    (pending,), _ = a.add([item(1)], pending=True)  # replica a is storing the vectors of item 1

    def finish() -> None:
        time.sleep(0.3)
        replica_writes.store_vectors(a, store, TASKS, np.array([pending]), vectors(1))

    thread = threading.Thread(target=finish)
    thread.start()
    started = time.monotonic()
    ids, new = replica_writes.add(b, store, TASKS, [item(1), item(2)], vectors(2, seed=1))
    thread.join()
    assert time.monotonic() - started >= 0.25  # answered once a committed it, not before
    assert ids[0] == pending and new == [False, True]
    assert b.states(ids) == {ids[0]: "committed", ids[1]: "committed"}
    # Rolled back instead (a crashed, repaired): the duplicate is added here as new content.
    (stuck,), _ = a.add([item(3)], pending=True)
    threading.Timer(0.2, lambda: a.rollback([stuck])).start()
    (added,), (is_new,) = replica_writes.add(b, store, TASKS, [item(3)], vectors(1, seed=2))
    assert is_new and added != stuck and b.get([added])[added].content_hash == item(3).content_hash
    a.add([item(7)], pending=True)  # and never committed: the duplicate gives up after wait_s
    with pytest.raises(replica_writes.ReplicaWriteError, match="not committed within"):
        replica_writes.add(b, store, TASKS, [item(7)], vectors(1), wait_s=0.2)
