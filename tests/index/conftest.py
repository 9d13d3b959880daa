"""Shared fixtures for the index tests: every backend through one factory, random unit vectors, an oracle.

Backends under contract (``BACKEND_CASES``): one or more variants of every name in ``index.store.BACKENDS``
(a backend added there runs under its defaults until ``VARIANTS`` lists cases for it): faiss flat (faiss
search and the torch matmul path on CPU), faiss HNSW (exact in practice on these tiny galleries:
``ef_search`` exceeds the gallery size, so the graph walk visits every vector), faiss IVF-PQ (approximate:
only the checks that do not need exactness) and Milvus Lite (one database file per test module; each store
gets its own collection prefix). ``CONTRACT_CASES`` adds the Milvus server (``tests.milvus_server``: one
server per session, marked ``cluster``; each store gets its own collection prefix, dropped after the
test) for the contract suite. A test parametrised with a case whose backend's optional dependencies are
missing (Milvus without pymilvus and milvus-lite) is skipped with the reason; ``needs_milvus_lite`` marks
the Milvus tests that are not parametrised.
"""

from __future__ import annotations

import importlib.util
import itertools
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest

from index.store import BACKENDS, VectorStore, open_store
from tests.milvus_server import MilvusServer, drop_collections

DIM = 8
TASKS = ["Smiling", "Eyeglasses"]
MODEL_HASH = "0" * 64
SCORE_TOL = 1e-5


@dataclass(frozen=True)
class BackendCase:
    name: str
    backend: str
    options: dict[str, Any] = field(default_factory=dict)
    exact: bool = True
    persists_unsaved: bool = False  # Milvus keeps acknowledged writes without save()
    server: bool = False  # a Milvus server (the session's ``milvus_server``) rather than a Lite file

    @property
    def skip_reason(self) -> str | None:
        """Why this case cannot run here (its backend's optional dependencies are missing), else None.
        A server case needs no milvus-lite: the ``milvus_server`` fixture skips, saying why, on its own."""
        return None if self.server else MISSING_MODULES.get(self.backend)


MILVUS_LITE = all(importlib.util.find_spec(name) is not None for name in ("pymilvus", "milvus_lite"))
MISSING_MODULES = {} if MILVUS_LITE else {"milvus": "pymilvus / milvus-lite not installed (modret[milvus])"}
needs_milvus_lite = pytest.mark.skipif(not MILVUS_LITE, reason=MISSING_MODULES.get("milvus", ""))

# Cases per backend name; a name of BACKENDS without an entry runs as one case under its defaults.
VARIANTS: dict[str, list[BackendCase]] = {
    "faiss": [
        BackendCase("faiss-flat", "faiss", {"kind": "flat", "search_device": "faiss"}),
        BackendCase("faiss-flat-torch", "faiss", {"kind": "flat", "search_device": "cpu"}),
        BackendCase("faiss-hnsw", "faiss", {"kind": "hnsw", "ef_search": 256}),
        BackendCase("faiss-ivfpq", "faiss", {"kind": "ivfpq"}, exact=False),
    ],
    "milvus": [BackendCase("milvus-lite", "milvus", persists_unsaved=True)],
}
BACKEND_CASES = [case for name in BACKENDS for case in VARIANTS.get(name, [BackendCase(name, name)])]
EXACT_CASES = [case for case in BACKEND_CASES if case.exact]
MILVUS_SERVER_CASE = BackendCase("milvus-server", "milvus", persists_unsaved=True, server=True)


def case_params(cases: Sequence[BackendCase]) -> list[Any]:
    """``cases`` as ``pytest.param``s named by case, server cases marked ``cluster``."""
    return [pytest.param(c, id=c.name, marks=[pytest.mark.cluster] if c.server else []) for c in cases]


CONTRACT_CASES = case_params([*BACKEND_CASES, MILVUS_SERVER_CASE])


@pytest.fixture(autouse=True)
def _skip_unavailable_backend(request: pytest.FixtureRequest) -> None:
    """Skip a test parametrised with a ``case`` whose backend cannot run here (see ``skip_reason``)."""
    callspec = getattr(request.node, "callspec", None)
    case = callspec.params.get("case") if callspec is not None else None
    if isinstance(case, BackendCase) and case.skip_reason:
        pytest.skip(case.skip_reason)


_prefixes = itertools.count()
StoreFactory = Callable[[], VectorStore]


def unit_vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def vectors_by_task(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {task: unit_vectors(rng, n) for task in TASKS}


def end_process_state(milvus_uri: str) -> None:
    """Drop what this process holds beyond the files, as a process exit would, so that a store opened next
    sees only what a new process (a restarted service, ``modret index verify``) would see.

    For faiss nothing survives but the files already. Milvus Lite runs its server inside the process that
    first opened a ``.db`` file, one per file, kept until exit; stopping it makes the next client start a
    fresh server over the same file, whose collections come up released, as they do in a new process."""
    if not MILVUS_LITE:
        return  # no Milvus Lite server can be running
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(milvus_uri)


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("milvus") / "gallery.db")


class MakeStore(Protocol):
    def __call__(self, case: BackendCase, tasks: Sequence[str] = TASKS) -> StoreFactory: ...


@pytest.fixture
def make_store_for(tmp_path: Path, milvus_uri: str, request: pytest.FixtureRequest) -> Iterator[MakeStore]:
    """``make_store_for(case)`` returns a factory; each call of the factory opens the same store anew.
    ``tasks`` defaults to ``TASKS``. A server case starts (or reuses) the session's Milvus server."""
    opened: list[VectorStore] = []
    server: MilvusServer | None = None
    server_prefix = f"t{uuid.uuid4().hex[:12]}"  # this test's collections on the shared server

    def for_case(case: BackendCase, tasks: Sequence[str] = TASKS) -> StoreFactory:
        nonlocal server
        root = tmp_path / f"store-{next(_prefixes)}"
        options = dict(case.options)
        if case.server:
            server = request.getfixturevalue("milvus_server")
            assert server is not None
            prefix = f"{server_prefix}_{root.name.replace('-', '_')}"
            options |= {"uri": server.uri, "collection_prefix": prefix}
        elif case.backend == "milvus":
            options |= {"uri": milvus_uri, "collection_prefix": f"t{root.name.replace('-', '_')}"}

        def make() -> VectorStore:
            store = open_store(
                case.backend, root, tasks=tasks, dim=DIM, model_hash=MODEL_HASH, options=options
            )
            opened.append(store)
            return store

        return make

    yield for_case
    for store in opened:
        store.close()
    if server is not None and server.running:
        drop_collections(server, server_prefix)


class Oracle:
    """Brute-force numpy reference: id -> vector per task."""

    def __init__(self) -> None:
        self.vectors: dict[int, dict[str, np.ndarray]] = {}

    def add(self, ids: np.ndarray, by_task: dict[str, np.ndarray]) -> None:
        for row, i in enumerate(ids):
            self.vectors[int(i)] = {task: by_task[task][row] for task in TASKS}

    def remove(self, ids: np.ndarray) -> None:
        for i in ids:
            self.vectors.pop(int(i), None)

    def ids(self) -> np.ndarray:
        return np.array(sorted(self.vectors), dtype=np.int64)

    def scores(
        self, task: str, queries: np.ndarray, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids() if allowed is None else np.intersect1d(self.ids(), allowed)
        if not len(ids):
            return ids, np.empty((len(queries), 0), dtype=np.float32)
        matrix = np.stack([self.vectors[int(i)][task] for i in ids])
        return ids, queries @ matrix.T


def assert_matches_oracle(
    result_ids: np.ndarray,
    result_scores: np.ndarray,
    oracle: Oracle,
    task: str,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray | None = None,
) -> None:
    """Same top-k as brute force up to ties: scores agree within SCORE_TOL position by position, every
    returned id's true score equals its reported score, and padding exactly where fewer than k qualify."""
    ids, scores = oracle.scores(task, queries, allowed)
    expected_n = min(k, len(ids))
    assert result_ids.shape == result_scores.shape == (len(queries), k)
    for q in range(len(queries)):
        want = np.sort(scores[q])[::-1][:expected_n]
        np.testing.assert_allclose(result_scores[q, :expected_n], want, atol=SCORE_TOL)
        got = result_ids[q, :expected_n]
        assert len(set(got.tolist())) == expected_n
        true = scores[q][np.searchsorted(ids, got)]
        assert np.isin(got, ids).all()
        np.testing.assert_allclose(result_scores[q, :expected_n], true, atol=SCORE_TOL)
        assert (result_ids[q, expected_n:] == -1).all()
        assert np.isneginf(result_scores[q, expected_n:]).all()
