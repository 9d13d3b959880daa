"""The VectorStore contract, run unchanged against every backend in CONTRACT_CASES (BACKEND_CASES and the
Milvus server, marked ``cluster``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from index.store import DuplicateIdError, UnknownIdError, UnknownTaskError, VectorStore, open_store
from tests.index.conftest import (
    CONTRACT_CASES,
    DIM,
    MODEL_HASH,
    SCORE_TOL,
    TASKS,
    BackendCase,
    Oracle,
    StoreFactory,
    assert_matches_oracle,
    end_process_state,
    unit_vectors,
    vectors_by_task,
)

N = 40  # ≥ the IVF-PQ training minimum, small enough for HNSW to be exact

pytestmark = pytest.mark.parametrize("case", CONTRACT_CASES)


@pytest.fixture
def factory(case: BackendCase, make_store_for: Callable[[BackendCase], StoreFactory]) -> StoreFactory:
    return make_store_for(case)


def filled(factory: StoreFactory, seed: int = 0) -> tuple[VectorStore, Oracle, np.random.Generator]:
    rng = np.random.default_rng(seed)
    store, oracle = factory(), Oracle()
    ids = np.arange(100, 100 + N, dtype=np.int64)
    by_task = vectors_by_task(rng, N)
    store.add(ids, by_task)
    oracle.add(ids, by_task)
    return store, oracle, rng


def check_search(
    case: BackendCase,
    store: VectorStore,
    oracle: Oracle,
    task: str,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray | None = None,
) -> None:
    result = store.search(task, queries, k, allowed)
    if case.exact:
        assert_matches_oracle(result.ids, result.scores, oracle, task, queries, k, allowed)
        return
    # Approximate backends: only valid, distinct, allowed ids, padded with -1.
    valid = oracle.ids() if allowed is None else np.intersect1d(oracle.ids(), allowed)
    for row in result.ids:
        hits = row[row >= 0]
        assert np.isin(hits, valid).all()
        assert len(set(hits.tolist())) == len(hits)
        assert (row[len(hits) :] == -1).all()


def test_add_search_matches_brute_force(case: BackendCase, factory: StoreFactory) -> None:
    store, oracle, rng = filled(factory)
    assert store.tasks() == TASKS
    for task in TASKS:
        assert store.count(task) == N
        np.testing.assert_array_equal(store.ids(task), oracle.ids())
        check_search(case, store, oracle, task, unit_vectors(rng, 5), 10)


def test_save_load_round_trip(case: BackendCase, factory: StoreFactory) -> None:
    store, oracle, rng = filled(factory)
    queries = unit_vectors(rng, 4)
    before = store.search("Smiling", queries, 7)
    manifest = store.save()
    assert manifest.counts == {task: N for task in TASKS}
    assert manifest.model_hash == MODEL_HASH and manifest.embedding_dim == DIM
    reopened = factory()
    assert reopened.manifest is not None and reopened.manifest.generation == manifest.generation
    after = reopened.search("Smiling", queries, 7)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_allclose(after.scores, before.scores, atol=1e-6)
    check_search(case, reopened, oracle, "Eyeglasses", queries, 7)


def check_get(case: BackendCase, store: VectorStore, oracle: Oracle, task: str, ids: np.ndarray) -> None:
    got = store.get(task, ids)
    assert got.shape == (len(ids), DIM) and got.dtype == np.float32
    want = np.stack([oracle.vectors[int(i)][task] for i in ids]) if len(ids) else got
    if case.exact:
        np.testing.assert_allclose(got, want, atol=1e-6)
    elif len(ids):  # IVF-PQ decodes its compressed codes: close to the vector added, not equal
        cosine = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1)
        assert cosine.min() > 0.75 and cosine.mean() > 0.9, cosine


def test_get_returns_the_stored_vectors(case: BackendCase, factory: StoreFactory) -> None:
    store, oracle, _ = filled(factory)
    asked = np.array([139, 100, 117, 100, 120], dtype=np.int64)  # any order, repeats allowed
    for task in TASKS:
        check_get(case, store, oracle, task, asked)
    check_get(case, store, oracle, "Smiling", np.array([], dtype=np.int64))
    store.remove(np.array([117, 118]))
    oracle.remove(np.array([117, 118]))
    with pytest.raises(UnknownIdError, match=r"2 id\(s\) not stored under task 'Eyeglasses': 117, 5000") as e:
        store.get("Eyeglasses", np.array([100, 5000, 117, 139], dtype=np.int64))
    assert e.value.ids.tolist() == [117, 5000]
    with pytest.raises(UnknownTaskError, match="unknown task 'Bald'"):
        store.get("Bald", np.array([100]))
    with pytest.raises(ValueError, match="1-D integer"):
        store.get("Smiling", np.array([[100]]))
    check_get(case, store, oracle, "Eyeglasses", oracle.ids())


def test_reopened_in_a_fresh_process(case: BackendCase, factory: StoreFactory, milvus_uri: str) -> None:
    """What a restarted service sees: only the saved files (and, for Milvus, the database file)."""
    store, oracle, rng = filled(factory)
    store.remove(np.array([101, 130]))
    oracle.remove(np.array([101, 130]))
    manifest = store.save()
    store.close()
    end_process_state(milvus_uri)
    reopened = factory()
    assert reopened.manifest is not None and reopened.manifest.generation == manifest.generation
    for task in TASKS:
        assert reopened.count(task) == N - 2
        np.testing.assert_array_equal(reopened.ids(task), oracle.ids())
        check_search(case, reopened, oracle, task, unit_vectors(rng, 3), 5)
        check_get(case, reopened, oracle, task, oracle.ids()[::7])
    more = vectors_by_task(rng, 2)
    reopened.add(np.array([500, 501], dtype=np.int64), more)
    oracle.add(np.array([500, 501], dtype=np.int64), more)
    check_search(case, reopened, oracle, "Smiling", more["Smiling"], 3)


def test_ids_stable_after_deletes(case: BackendCase, factory: StoreFactory) -> None:
    store, oracle, _ = filled(factory)
    removed = np.array([100, 117, 139, 5000], dtype=np.int64)  # 5000 was never added: ignored
    assert store.remove(removed) == 3
    oracle.remove(removed)
    assert store.remove(removed) == 0
    for task in TASKS:
        assert store.count(task) == N - 3
        np.testing.assert_array_equal(store.ids(task), oracle.ids())
    # Each surviving vector still finds itself under its own id, through save and reload too.
    survivors = oracle.ids()
    own = np.stack([oracle.vectors[int(i)]["Smiling"] for i in survivors])
    check_search(case, store, oracle, "Smiling", own, 3)
    store.save()
    reopened = factory()
    np.testing.assert_array_equal(reopened.ids("Smiling"), survivors)
    check_search(case, reopened, oracle, "Smiling", own, 3)
    if case.exact:
        np.testing.assert_array_equal(reopened.search("Smiling", own, 1).ids[:, 0], survivors)


def test_readding_a_removed_id(case: BackendCase, factory: StoreFactory) -> None:
    store, oracle, rng = filled(factory)
    store.remove(np.array([105]))
    again = vectors_by_task(rng, 1)
    store.add(np.array([105]), again)
    oracle.add(np.array([105]), again)
    assert store.count("Smiling") == N
    check_search(case, store, oracle, "Smiling", again["Smiling"], 5)


def test_filter_restricts_results(case: BackendCase, factory: StoreFactory) -> None:
    store, oracle, rng = filled(factory)
    store.remove(np.array([101]))
    oracle.remove(np.array([101]))
    allowed = np.array([101, 102, 110, 111, 125, 130, 131, 9999], dtype=np.int64)  # 101 removed, 9999 absent
    queries = unit_vectors(rng, 3)
    for k in (2, 10):
        check_search(case, store, oracle, "Eyeglasses", queries, k, allowed)
    result = store.search("Eyeglasses", queries, 10, allowed)
    assert set(result.ids[result.ids >= 0].tolist()) <= {102, 110, 111, 125, 130, 131}
    nothing = store.search("Eyeglasses", queries, 4, np.array([], dtype=np.int64))
    assert (nothing.ids == -1).all() and np.isneginf(nothing.scores).all()


def test_empty_index(case: BackendCase, factory: StoreFactory) -> None:
    store = factory()
    assert store.count("Smiling") == 0
    assert len(store.ids("Smiling")) == 0
    result = store.search("Smiling", unit_vectors(np.random.default_rng(0), 2), 5)
    assert result.ids.shape == (2, 5) and (result.ids == -1).all() and np.isneginf(result.scores).all()
    manifest = store.save()
    assert manifest.counts == {task: 0 for task in TASKS}
    assert factory().count("Eyeglasses") == 0


def test_k_larger_than_gallery(case: BackendCase, factory: StoreFactory) -> None:
    store, oracle, rng = filled(factory)
    result = store.search("Smiling", unit_vectors(rng, 2), N + 15)
    check_search(case, store, oracle, "Smiling", unit_vectors(rng, 2), N + 15)
    if case.exact:
        assert (np.sort(result.ids[:, :N], axis=1) == oracle.ids()).all()
        assert (result.ids[:, N:] == -1).all()


def test_unknown_task_is_a_clear_error(case: BackendCase, factory: StoreFactory) -> None:
    store, _, rng = filled(factory)
    for call in (
        lambda: store.search("Bald", unit_vectors(rng, 1), 3),
        lambda: store.count("Bald"),
        lambda: store.add(np.array([1]), {"Bald": unit_vectors(rng, 1), **vectors_by_task(rng, 1)}),
    ):
        with pytest.raises(UnknownTaskError, match=r"unknown task 'Bald'.*Smiling, Eyeglasses"):
            call()


def test_bad_input_is_rejected(case: BackendCase, factory: StoreFactory) -> None:
    store, _, rng = filled(factory)
    with pytest.raises(DuplicateIdError):
        store.add(np.array([100], dtype=np.int64), vectors_by_task(rng, 1))
    with pytest.raises(ValueError, match="missing: Eyeglasses"):
        store.add(np.array([1], dtype=np.int64), {"Smiling": unit_vectors(rng, 1)})
    with pytest.raises(ValueError, match="shape"):
        store.search("Smiling", unit_vectors(rng, 1, DIM + 1), 3)
    assert store.count("Smiling") == N


def reopened_as_is(case: BackendCase, store: VectorStore) -> VectorStore:
    """The store at ``store.root`` opened anew with its current tasks (and, for Milvus, collection names),
    as a gallery whose config recorded the task change opens it."""
    options = dict(case.options)
    if case.backend == "milvus":
        kept = {k: v for k, v in store.options.items() if k in ("collection_prefix", "collections")}  # type: ignore[attr-defined]
        options |= {"uri": store.uri, **kept}  # type: ignore[attr-defined]
    return open_store(
        case.backend, store.root, tasks=store.tasks(), dim=DIM, model_hash=MODEL_HASH, options=options
    )


def test_add_task_holds_every_stored_id_and_survives_a_reopen(
    case: BackendCase, factory: StoreFactory, milvus_uri: str
) -> None:
    store, oracle, rng = filled(factory)
    store.remove(np.array([101, 130]))  # HNSW tombstones them: the new task must not count them
    oracle.remove(np.array([101, 130]))
    ids = rng.permutation(oracle.ids())  # any order
    bald = unit_vectors(rng, len(ids))
    store.add_task("Bald", ids, bald)
    for i, vector in zip(ids, bald, strict=True):
        oracle.vectors[int(i)]["Bald"] = vector
    assert store.tasks() == [*TASKS, "Bald"]
    assert {task: store.count(task) for task in store.tasks()} == {t: N - 2 for t in store.tasks()}
    np.testing.assert_array_equal(store.ids("Bald"), oracle.ids())
    check_search(case, store, oracle, "Bald", unit_vectors(rng, 3), 5)
    check_get(case, store, oracle, "Bald", ids[:7])
    more = {**vectors_by_task(rng, 2), "Bald": unit_vectors(rng, 2)}  # later adds carry every task
    store.add(np.array([600, 601], dtype=np.int64), more)
    for row, i in enumerate((600, 601)):
        oracle.vectors[i] = {task: more[task][row] for task in more}
    manifest = store.save()
    assert manifest.tasks == [*TASKS, "Bald"] and manifest.counts["Bald"] == N
    store.close()
    end_process_state(milvus_uri)
    reopened = reopened_as_is(case, store)
    try:
        assert reopened.tasks() == [*TASKS, "Bald"]
        for task in reopened.tasks():
            np.testing.assert_array_equal(reopened.ids(task), oracle.ids())
            check_search(case, reopened, oracle, task, unit_vectors(rng, 3), 5)
        check_get(case, reopened, oracle, "Bald", np.array([600, 100, 139], dtype=np.int64))
    finally:
        reopened.close()


def test_add_task_refuses_what_does_not_fit(case: BackendCase, factory: StoreFactory) -> None:
    store, oracle, rng = filled(factory)
    ids = oracle.ids()
    with pytest.raises(ValueError, match=r"exactly the 40 stored ids: 1 missing \(e.g. \[139\]\), 0 not"):
        store.add_task("Bald", ids[:-1], unit_vectors(rng, N - 1))
    with pytest.raises(ValueError, match=r"0 missing .* 1 not stored \(e.g. \[7\]\)"):
        store.add_task("Bald", np.append(ids, 7), unit_vectors(rng, N + 1))
    with pytest.raises(DuplicateIdError, match="distinct"):
        store.add_task("Bald", np.append(ids, 100), unit_vectors(rng, N + 1))
    with pytest.raises(ValueError, match="shape"):
        store.add_task("Bald", ids, unit_vectors(rng, N, DIM + 1))
    with pytest.raises(ValueError, match="'Smiling' is already in the index"):
        store.add_task("Smiling", ids, unit_vectors(rng, N))
    assert store.tasks() == TASKS
    with pytest.raises(UnknownTaskError):
        store.count("Bald")


def test_restore_task_undoes_a_removal_exactly(case: BackendCase, factory: StoreFactory) -> None:
    store, oracle, rng = filled(factory)
    queries = unit_vectors(rng, 3)
    before = {t: store.search(t, queries, 5) for t in TASKS}
    store.remove_task(TASKS[0])  # the first task: it comes back first, before the others
    store.restore_task(TASKS[0])
    assert store.tasks() == TASKS and store.count(TASKS[0]) == N
    for task in TASKS:
        after = store.search(task, queries, 5)
        np.testing.assert_array_equal(after.ids, before[task].ids)
        np.testing.assert_allclose(after.scores, before[task].scores, atol=SCORE_TOL)
    check_get(case, store, oracle, TASKS[0], oracle.ids()[:5])
    store.close()


def test_remove_task_drops_one_index_and_keeps_the_others(
    case: BackendCase, factory: StoreFactory, milvus_uri: str
) -> None:
    store, oracle, rng = filled(factory)
    store.remove_task("Smiling")
    assert store.tasks() == ["Eyeglasses"]
    with pytest.raises(UnknownTaskError):
        store.search("Smiling", unit_vectors(rng, 1), 3)
    with pytest.raises(UnknownTaskError):
        store.remove_task("Smiling")
    check_search(case, store, oracle, "Eyeglasses", unit_vectors(rng, 3), 5)
    store.add(np.array([700], dtype=np.int64), {"Eyeglasses": unit_vectors(rng, 1)})
    assert store.count("Eyeglasses") == N + 1
    with pytest.raises(ValueError, match="only task"):
        store.remove_task("Eyeglasses")
    store.save()
    store.discard_removed()
    store.close()
    end_process_state(milvus_uri)
    reopened = reopened_as_is(case, store)
    try:
        assert reopened.tasks() == ["Eyeglasses"] and reopened.count("Eyeglasses") == N + 1
        check_get(case, reopened, oracle, "Eyeglasses", oracle.ids()[:5])
    finally:
        reopened.close()
