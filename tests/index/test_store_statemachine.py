"""A Hypothesis state machine over add/remove/search/save/reload, checked against a brute-force oracle.

Runs once per exact backend. Ids come from a counter and are never reused (as the metadata guarantees);
some adds copy existing vectors under new ids to create exact ties. A reload opens the store anew from
disk: faiss returns to the last saved state (unsaved changes are lost by design), Milvus keeps every
acknowledged write. The Milvus Lite store is shared by all examples of the run (emptied at the start of
each) because creating collections dominates its cost.
"""

from __future__ import annotations

import copy
import itertools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from index.store import VectorStore, open_store
from tests.index.conftest import (
    DIM,
    EXACT_CASES,
    MODEL_HASH,
    TASKS,
    BackendCase,
    Oracle,
    assert_matches_oracle,
    unit_vectors,
)

_ids = itertools.count()


def machine_for(case: BackendCase) -> type[RuleBasedStateMachine]:
    shared: dict[str, Path] = {}

    class StoreMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            if case.backend == "milvus":
                if "root" not in shared:
                    shared["root"] = Path(tempfile.mkdtemp(prefix="modret-sm-"))
                self.root = shared["root"]
            else:
                self.root = Path(tempfile.mkdtemp(prefix="modret-sm-"))
            self.store = self.open()
            self.store.remove(self.store.ids(TASKS[0]))  # shared Milvus store: start empty
            self.oracle = Oracle()
            self.saved = Oracle()

        def open(self) -> VectorStore:
            return open_store(
                case.backend, self.root, tasks=TASKS, dim=DIM, model_hash=MODEL_HASH, options=case.options
            )

        @rule(n=st.integers(1, 8), seed=st.integers(0, 2**32 - 1), tie=st.booleans())
        def add(self, n: int, seed: int, tie: bool) -> None:
            rng = np.random.default_rng(seed)
            ids = np.array([next(_ids) for _ in range(n)], dtype=np.int64)
            by_task = {task: unit_vectors(rng, n) for task in TASKS}
            if tie and self.oracle.vectors:
                source = self.oracle.vectors[int(rng.choice(self.oracle.ids()))]
                for task in TASKS:
                    by_task[task][0] = source[task]
            self.store.add(ids, by_task)
            self.oracle.add(ids, by_task)

        @rule(data=st.data())
        def remove(self, data: st.DataObject) -> None:
            present = self.oracle.ids().tolist()
            chosen = data.draw(st.lists(st.sampled_from(present), unique=True) if present else st.just([]))
            ids = np.array([*chosen, 10**12], dtype=np.int64)  # plus an id never added
            assert self.store.remove(ids) == len(chosen)
            self.oracle.remove(ids)

        @rule(
            task=st.sampled_from(TASKS),
            k=st.integers(1, 12),
            num_queries=st.integers(1, 3),
            seed=st.integers(0, 2**32 - 1),
            filtered=st.booleans(),
        )
        def search(self, task: str, k: int, num_queries: int, seed: int, filtered: bool) -> None:
            rng = np.random.default_rng(seed)
            queries = unit_vectors(rng, num_queries)
            allowed = None
            if filtered:
                pool = np.concatenate([self.oracle.ids(), [10**12]])
                allowed = rng.choice(pool, size=rng.integers(0, len(pool) + 1), replace=False).astype(
                    np.int64
                )
            result = self.store.search(task, queries, k, allowed)
            assert_matches_oracle(result.ids, result.scores, self.oracle, task, queries, k, allowed)

        @rule()
        def save(self) -> None:
            manifest = self.store.save()
            assert manifest.counts == {task: len(self.oracle.vectors) for task in TASKS}
            self.saved = copy.deepcopy(self.oracle)

        @rule()
        def reload(self) -> None:
            self.store.close()
            self.store = self.open()
            if not case.persists_unsaved:
                self.oracle = copy.deepcopy(self.saved)

        @invariant()
        def counts_and_ids_agree(self) -> None:
            for task in TASKS:
                assert self.store.count(task) == len(self.oracle.vectors)
            np.testing.assert_array_equal(self.store.ids(TASKS[-1]), self.oracle.ids())

        def teardown(self) -> None:
            self.store.close()
            if case.backend != "milvus":
                shutil.rmtree(self.root, ignore_errors=True)

    return StoreMachine


for _case in EXACT_CASES:
    _cheap = _case.backend != "milvus"
    _test = machine_for(_case).TestCase
    _test.settings = settings(
        max_examples=30 if _cheap else 6,
        stateful_step_count=25 if _cheap else 15,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    if _case.skip_reason:
        _test = pytest.mark.skip(reason=_case.skip_reason)(_test)
    globals()[f"TestStoreMachine_{_case.name.replace('-', '_')}"] = _test
del _case, _cheap, _test  # or pytest would collect the last machine twice
