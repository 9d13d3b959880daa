"""The vector-store contract every backend fulfils, and the table that opens one by name.

A store holds, for every task the model knows, one set of L2-normalised float32 vectors keyed by int64
ids (assigned by the gallery metadata: stable, never reused). The score of a match is the inner product,
i.e. the cosine similarity. Searches answer ``k`` columns per query, best first; when fewer than ``k``
items qualify the row is padded with id ``-1`` and score ``-inf`` so that callers always get rectangular
arrays.

``get(task, ids)`` returns the stored vectors themselves, one row per requested id in the order asked
(exact copies for the flat and HNSW kinds and Milvus; IVF-PQ keeps only compressed codes and returns
their decoded approximation); an id not stored is an ``UnknownIdError`` naming it.

``filter`` is an array of allowed ids (the metadata resolves label filters such as ``{"Male": 1}`` to it);
``None`` means every id is allowed, an empty array means none is.

Durability is the backend's: ``save()`` commits a generation (see ``index.generations``) and ``load()``
replaces the in-memory state with the newest generation that verifies, falling back to older ones.
Backends: ``BACKENDS`` maps each name the CLI's ``--backend`` accepts to the module that implements it
(``"faiss"`` -> ``index.faiss_store``, ``"milvus"`` -> ``index.milvus_store``); it is the only place that
lists them. Each backend module names its store class ``Store`` (constructed as
``Store(root, *, tasks, dim, model_hash, **options)``). ``store_class(name)`` imports the module of
``name`` on first use (``importlib``), so this module imports no backend: the implementations import the
contract, never the other way round, and opening a Milvus store imports no faiss (Milvus Lite 3, which
serves a ``.db`` file inside the process, brings its own; a Milvus server does not). A name not in the
table is an ``UnknownBackendError`` listing the known ones; a backend whose optional dependencies are
missing raises ``BackendUnavailableError`` naming the extra to install.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from index.generations import Generations, Manifest

PAD_ID = -1


class UnknownTaskError(LookupError):
    """A task name the store was not built for; the message lists the known ones."""

    def __init__(self, task: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown task {task!r}; this index knows: {', '.join(known)}")
        self.task = task


class StoreUnavailable(ConnectionError):
    """The vector store's engine failed a call (a Milvus server away, refusing or timing out): nothing is
    wrong with the request, it may be retried."""


class UnknownIdError(LookupError):
    """``get`` was asked for ids that are not stored; ``ids`` holds them (sorted, distinct)."""

    def __init__(self, ids: np.ndarray, task: str) -> None:
        self.ids = np.unique(np.asarray(ids, dtype=np.int64))
        shown = ", ".join(str(int(i)) for i in self.ids[:10]) + (", …" if len(self.ids) > 10 else "")
        super().__init__(f"{len(self.ids)} id(s) not stored under task {task!r}: {shown}")
        self.task = task


class DuplicateIdError(ValueError):
    """``add`` was given an id that is already stored (ids are never reused)."""


class SearchResult(NamedTuple):
    ids: np.ndarray  # (Q, k) int64, PAD_ID where fewer than k items qualify
    scores: np.ndarray  # (Q, k) float32 inner products, -inf where padded


@runtime_checkable
class VectorStore(Protocol):
    """One vector set per task; see the module docstring for the conventions."""

    root: Path
    dim: int
    model_hash: str
    generations: Generations
    manifest: Manifest | None  # the generation last loaded or saved

    def tasks(self) -> list[str]: ...

    def count(self, task: str) -> int: ...

    def ids(self, task: str) -> np.ndarray:
        """All ids stored for ``task``, sorted (int64)."""
        ...

    def get(self, task: str, ids: np.ndarray) -> np.ndarray:
        """The stored (n, D) float32 vectors of ``ids`` under ``task``, row i for ``ids[i]``; raises
        ``UnknownTaskError`` / ``UnknownIdError`` for a task or an id that is not stored."""
        ...

    def add(self, ids: np.ndarray, vectors_by_task: dict[str, np.ndarray]) -> None:
        """Store ``vectors_by_task[t][i]`` under ``ids[i]`` for every task ``t`` (all tasks at once)."""
        ...

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids`` from every task; returns how many were present. Unknown ids are ignored."""
        ...

    def add_task(self, task: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add an index for a new ``task`` (last in task order) holding ``vectors[i]`` (n, D) under
        ``ids[i]``, which must be exactly the ids every other task holds (``ValueError`` otherwise, and
        for a task already stored). Durable as the store's writes are: faiss with the next save, Milvus
        on return."""
        ...

    def remove_task(self, task: str) -> None:
        """Drop ``task``'s index from the store (``UnknownTaskError`` for a task not stored; the last task
        stays). Data kept outside the store's generations (a Milvus collection) stays until
        ``discard_removed``, so that a crash before the gallery records the removal loses nothing."""
        ...

    def restore_task(self, task: str) -> None:
        """Undo ``remove_task(task)`` (not yet ``discard_removed``): the task is back where it was, its
        vectors as they were; for a task change that could not be recorded (a full disk, say)."""
        ...

    def discard_removed(self) -> None:
        """Delete the data of the tasks removed since the last call (faiss: none is left to delete)."""
        ...

    def search(
        self, task: str, queries: np.ndarray, k: int, filter: np.ndarray | None = None
    ) -> SearchResult: ...

    def save(self) -> Manifest:
        """Commit the current state as a new durable generation and return its manifest."""
        ...

    def load(self) -> Manifest | None:
        """Replace the in-memory state with the newest good generation; ``None`` when none exists."""
        ...

    def close(self) -> None: ...


StoreFactory = Callable[..., VectorStore]  # Store(root, *, tasks, dim, model_hash, **options)

# name (as ``--backend`` and gallery.json spell it) -> module defining ``Store``; imported on first use.
BACKENDS: dict[str, str] = {"faiss": "index.faiss_store", "milvus": "index.milvus_store"}


class UnknownBackendError(ValueError):
    """A backend name that is not in ``BACKENDS``; the message lists the known ones."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown backend {name!r}; choose one of: {', '.join(sorted(BACKENDS))}")
        self.name = name


class BackendUnavailableError(ImportError):
    """A known backend whose optional dependencies are not installed; the message names the extra."""


def store_class(name: str) -> StoreFactory:
    """The ``Store`` class of backend ``name``, importing its module (``BACKENDS[name]``) on first use."""
    try:
        module_path = BACKENDS[name]
    except KeyError:
        raise UnknownBackendError(name) from None
    module = importlib.import_module(module_path)
    try:
        return cast(StoreFactory, module.Store)
    except AttributeError:
        raise TypeError(f"backend module {module_path} defines no Store class") from None


def open_store(
    backend: str,
    root: Path,
    *,
    tasks: Sequence[str],
    dim: int,
    model_hash: str,
    options: dict[str, Any] | None = None,
) -> VectorStore:
    """Open (and load, when a generation exists) the ``backend`` store rooted at ``root``."""
    factory = store_class(backend)
    store = factory(root, tasks=list(tasks), dim=dim, model_hash=model_hash, **(options or {}))
    store.load()
    return store


def check_task(task: str, known: Sequence[str]) -> None:
    if task not in known:
        raise UnknownTaskError(task, known)


def check_add(
    ids: np.ndarray, vectors_by_task: dict[str, np.ndarray], tasks: Sequence[str], dim: int
) -> None:
    """Validate an ``add`` call's shapes and task set (shared by every backend so they fail alike)."""
    if ids.ndim != 1 or ids.dtype != np.int64:
        raise ValueError(f"ids must be a 1-D int64 array, got {ids.dtype} of shape {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise DuplicateIdError("ids within one add call must be distinct")
    if (ids < 0).any():
        raise ValueError("ids must be non-negative (-1 marks padding in search results)")
    missing = set(tasks) - set(vectors_by_task)
    extra = set(vectors_by_task) - set(tasks)
    if extra:
        raise UnknownTaskError(sorted(extra)[0], tasks)
    if missing:
        raise ValueError(f"add must give vectors for every task; missing: {', '.join(sorted(missing))}")
    for task, vectors in vectors_by_task.items():
        if vectors.shape != (len(ids), dim):
            raise ValueError(f"vectors for {task!r} have shape {vectors.shape}, expected {(len(ids), dim)}")


def check_same_ids(given: np.ndarray, stored: np.ndarray, task: str) -> None:
    """``add_task``'s ids must be the stored ones, each once (shared by every backend so they fail alike)."""
    if len(np.unique(given)) != len(given):
        raise DuplicateIdError(f"ids for the new task {task!r} must be distinct")
    missing = np.setdiff1d(stored, given)
    extra = np.setdiff1d(given, stored)
    if len(missing) or len(extra):
        raise ValueError(
            f"the new task {task!r} needs a vector for exactly the {len(stored)} stored ids: "
            f"{len(missing)} missing (e.g. {missing[:5].tolist()}), {len(extra)} not stored "
            f"(e.g. {extra[:5].tolist()})"
        )


def as_ids(ids: np.ndarray | Sequence[int]) -> np.ndarray:
    """``ids`` as a 1-D int64 array (``get``'s argument, shared by every backend so they fail alike)."""
    array = np.asarray(ids)
    if array.ndim != 1 or (len(array) and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"ids must be a 1-D integer array, got {array.dtype} of shape {array.shape}")
    return array.astype(np.int64, copy=False)


def as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must have shape (Q, {dim}), got {queries.shape}")
    return queries


def padded(num_queries: int, k: int) -> SearchResult:
    return SearchResult(
        np.full((num_queries, k), PAD_ID, dtype=np.int64),
        np.full((num_queries, k), -np.inf, dtype=np.float32),
    )
