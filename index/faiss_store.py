"""The default backend: one faiss index per task, inner product on L2-normalised vectors (cosine).

Kinds (``kind=``):

- ``flat`` (default, and the right choice below about 1M vectors per task): ``IndexIDMap2`` over
  ``IndexFlatIP``. Exact. ``remove`` deletes in place; the id map keeps every other id unchanged.
- ``hnsw``: ``IndexIDMap2`` over ``IndexHNSWFlat`` (inner product). HNSW graphs cannot delete, so
  ``remove`` **tombstones**: removed ids are excluded from every search through a faiss ``IDSelector``
  (the graph walk skips them, so no over-fetch is needed and ``k`` results still come back) and are
  persisted with the generation. When tombstones exceed ``compact_fraction`` (10 %) of the stored vectors,
  ``save`` rebuilds the graphs without them first. Re-adding a tombstoned id rebuilds at once.
- ``ivfpq``: ``IndexIVFPQ`` with ids stored in its inverted lists (an ``IndexIDMap`` wrapper would
  mis-map ids after an IVF removal, so none is used). Trained on the first ``add`` (at least
  ``MIN_IVFPQ_TRAIN`` vectors); ``nlist`` ≈ 4·√n, ``m`` = D/4 sub-quantizers of up to 8 bits. Approximate;
  ``remove`` deletes from the inverted lists.

Filters are faiss ``SearchParameters(sel=IDSelectorBatch(allowed))``: the selector is applied inside the
search, so a filtered search returns the best ``k`` allowed items, not the allowed part of an unfiltered
top-k.

``get`` (stored vectors by id) reconstructs them: exactly for ``flat`` and ``hnsw`` (``IndexIDMap2``'s
reverse map; both keep the full vectors), approximately for ``ivfpq``, which keeps only PQ codes and
decodes the ones asked for after a scan of the inverted lists' ids.

On a CUDA machine exact (``flat``) search runs as a torch matmul + top-k on the GPU
(``index.gpu_search``): the faiss GPU wheels from PyPI do not run on H100/H200. ``search_device``:
``"auto"`` (CUDA when available, else faiss), ``"faiss"``, or a torch device such as ``"cpu"`` (used by
the tests to check agreement). The device copy of a task is rebuilt lazily after the task changes.

All tasks always hold the same ids (``add`` and ``remove`` act on every task under one write lock).
Threads: faiss' OpenMP pool is limited to ``omp_threads`` (default 1; ``None`` leaves faiss' default).
Concurrent searches from request threads (faiss releases the GIL) parallelise serving better than OpenMP
inside one search, and on the 2-core machine here OpenMP with 2 threads made a single flat query over
10k vectors 100× slower (50 ms instead of 0.4 ms) and IVF-PQ training 2× slower. OpenMP keeps the
setting per thread (a thread that never set it gets the default, one OpenMP thread per core), so every
search, add, remove and save applies it in the thread that calls it: request threads included.

Persistence goes through ``index.generations``: files ``task-NNN.faiss`` (NNN = the task's position) and,
for HNSW, ``tombstones.npy``. A loaded generation's options (kind and search parameters) override the
constructor's. ``save`` is ``capture`` (copies of the indexes in memory, under the read lock, so searches
go on) then ``commit`` (written and fsynced with no lock held): a gallery with a write-ahead log captures
between two writes and commits in the background (``index.gallery``). The copy costs the index's size in
memory while the snapshot is written.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss as faiss_typed
import numpy as np

from index.generations import GenerationError, Generations, Manifest
from index.rwlock import RWLock
from index.store import (
    DuplicateIdError,
    SearchResult,
    UnknownIdError,
    as_ids,
    as_queries,
    check_add,
    check_same_ids,
    check_task,
    padded,
)

if TYPE_CHECKING:
    from index.gpu_search import TorchExactSearcher

# faiss ships an incomplete __init__.pyi (no SearchParametersHNSW, no sub-index attributes such as
# ``id_map``), so the module is used untyped.
faiss: Any = faiss_typed

KINDS = ("flat", "hnsw", "ivfpq")
MIN_IVFPQ_TRAIN = 16
_MAX_TRAIN = 200_000  # k-means on more points than this buys no accuracy, only build time


def _task_file(position: int) -> str:
    return f"task-{position:03d}.faiss"


@dataclass
class FaissSnapshot:
    """Private copies of a store's indexes at one moment, to be written without holding its lock."""

    indexes: dict[str, Any]  # task -> cloned faiss index, in task order
    tombstones: np.ndarray
    options: dict[str, Any]
    counts: dict[str, int]

    def write(self, directory: Path) -> None:
        for position, index in enumerate(self.indexes.values()):
            faiss.write_index(index, str(directory / _task_file(position)))
        if len(self.tombstones):
            with open(directory / "tombstones.npy", "wb") as f:
                np.save(f, self.tombstones)


class FaissStore:
    backend = "faiss"

    def __init__(
        self,
        root: Path,
        *,
        tasks: list[str],
        dim: int,
        model_hash: str,
        kind: str = "flat",
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 64,
        nprobe: int = 16,
        compact_fraction: float = 0.1,
        search_device: str = "auto",
        omp_threads: int | None = 1,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown faiss index kind {kind!r}; choose one of: {', '.join(KINDS)}")
        self.root = root
        self.dim = dim
        self.model_hash = model_hash
        self._tasks = list(tasks)
        self.options: dict[str, Any] = {
            "kind": kind,
            "hnsw_m": hnsw_m,
            "ef_construction": ef_construction,
            "ef_search": ef_search,
            "nprobe": nprobe,
            "compact_fraction": compact_fraction,
        }
        self.search_device = search_device
        self.omp_threads = omp_threads
        self._limit_threads()
        self.generations = Generations(root)
        self.manifest: Manifest | None = None
        self._lock = RWLock()
        self._save_lock = threading.Lock()
        self._mirror_lock = threading.Lock()
        self._indexes = {task: self._new_index() for task in self._tasks}
        # A removed task's (position, index, mirror) until discard_removed, for restore_task
        self._removed: dict[str, tuple[int, Any, Any]] = {}
        self._tombstones = np.empty(0, dtype=np.int64)  # sorted; HNSW only
        self._mirrors: dict[str, TorchExactSearcher] = {}

    def _limit_threads(self) -> None:
        """Apply ``omp_threads`` in the calling thread (OpenMP's setting is per thread; see the docstring)."""
        if self.omp_threads is not None:
            faiss.omp_set_num_threads(self.omp_threads)

    @property
    def kind(self) -> str:
        return str(self.options["kind"])

    def _new_index(self) -> Any:
        if self.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if self.kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self.dim, self.options["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = self.options["ef_construction"]
            return faiss.IndexIDMap2(hnsw)
        # IVF-PQ is created untrained-empty; _train_ivfpq replaces it on the first add.
        return faiss.IndexIVFPQ(faiss.IndexFlatIP(self.dim), self.dim, 1, 1, 1, faiss.METRIC_INNER_PRODUCT)

    def _train_ivfpq(self, vectors: np.ndarray) -> Any:
        n = len(vectors)
        if n < MIN_IVFPQ_TRAIN:
            raise ValueError(
                f"an ivfpq index trains on its first add, which needs ≥ {MIN_IVFPQ_TRAIN} vectors"
            )
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        sub = self.dim // 4 if self.dim % 4 == 0 else self.dim
        nbits = min(8, int(math.log2(n)))
        index = faiss.IndexIVFPQ(
            faiss.IndexFlatIP(self.dim), self.dim, nlist, sub, nbits, faiss.METRIC_INNER_PRODUCT
        )
        sample = (
            vectors if n <= _MAX_TRAIN else vectors[np.random.default_rng(0).choice(n, _MAX_TRAIN, False)]
        )
        index.train(sample)
        return index

    # --- reading -------------------------------------------------------------------------------------

    def tasks(self) -> list[str]:
        return list(self._tasks)

    def _stored_ids(self, index: Any) -> np.ndarray:
        """Ids physically in ``index`` (tombstoned ones included), in storage order."""
        if self.kind != "ivfpq":
            return faiss.vector_to_array(index.id_map).astype(np.int64)
        lists = index.invlists
        parts = [
            faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
            for i in range(lists.nlist)
            if lists.list_size(i)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)

    def _live_ids(self, task: str) -> np.ndarray:
        stored = self._stored_ids(self._indexes[task])
        return stored[~np.isin(stored, self._tombstones)] if len(self._tombstones) else stored

    def count(self, task: str) -> int:
        check_task(task, self._tasks)
        with self._lock.read():
            return int(self._indexes[task].ntotal) - len(self._tombstones)

    def ids(self, task: str) -> np.ndarray:
        check_task(task, self._tasks)
        with self._lock.read():
            return np.sort(self._live_ids(task))

    def get(self, task: str, ids: np.ndarray) -> np.ndarray:
        check_task(task, self._tasks)
        ids = as_ids(ids)
        with self._lock.read():
            index = self._indexes[task]
            if self.kind == "ivfpq":
                vectors, found = self._ivf_reconstruct(index, ids)
            else:
                found = np.isin(ids, self._stored_ids(index))
                if len(self._tombstones):
                    found &= ~np.isin(ids, self._tombstones)
                vectors = None
            if not found.all():
                raise UnknownIdError(ids[~found], task)
            if vectors is None:
                vectors = index.reconstruct_batch(ids) if len(ids) else np.empty((0, self.dim))
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _ivf_reconstruct(self, index: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decoded vectors of ``ids`` found in the inverted lists, and which ids were found. A scan of the
        lists' ids (no per-id direct map is kept: it would cost as much memory as the codes)."""
        vectors = np.zeros((len(ids), self.dim), dtype=np.float32)
        found = np.zeros(len(ids), dtype=bool)
        wanted = np.unique(ids)
        lists = index.invlists
        for list_no in range(lists.nlist if len(wanted) else 0):
            size = lists.list_size(list_no)
            if not size:
                continue
            stored = faiss.rev_swig_ptr(lists.get_ids(list_no), size)
            for offset in np.flatnonzero(np.isin(stored, wanted)):
                rows = np.flatnonzero(ids == stored[offset])  # several when an id is asked for twice
                index.reconstruct_from_offset(list_no, int(offset), faiss.swig_ptr(vectors[rows[0]]))
                vectors[rows[1:]] = vectors[rows[0]]
                found[rows] = True
        return vectors, found

    def search(
        self, task: str, queries: np.ndarray, k: int, filter: np.ndarray | None = None
    ) -> SearchResult:
        check_task(task, self._tasks)
        queries = as_queries(queries, self.dim)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self._limit_threads()
        with self._lock.read():
            index = self._indexes[task]
            if index.ntotal == 0 or (filter is not None and len(filter) == 0):
                return padded(len(queries), k)
            device = self._torch_device()
            if device is not None:
                return self._mirror(task, device).search(queries, k, filter)
            return self._faiss_search(index, queries, k, filter)

    def _torch_device(self) -> str | None:
        if self.search_device == "faiss":
            return None
        if self.search_device == "auto":
            if self.kind != "flat":
                return None
            # Imported here: torch is heavy, and a CPU-only process that asks for faiss never needs it.
            from index.gpu_search import cuda_available

            return "cuda" if cuda_available() else None
        if self.kind != "flat":
            raise ValueError(
                f"search_device={self.search_device!r} needs kind='flat', this index is {self.kind}"
            )
        return self.search_device

    def _mirror(self, task: str, device: str) -> TorchExactSearcher:
        # Called under the read lock, so the index cannot change while the copy is made; the mirror lock
        # only stops two concurrent searches from building the same copy twice.
        with self._mirror_lock:
            mirror = self._mirrors.get(task)
            if mirror is None:
                from index.gpu_search import TorchExactSearcher

                index = self._indexes[task]
                vectors = index.index.reconstruct_n(0, index.ntotal)
                mirror = self._mirrors[task] = TorchExactSearcher(self._stored_ids(index), vectors, device)
            return mirror

    def _faiss_search(
        self, index: Any, queries: np.ndarray, k: int, filter: np.ndarray | None
    ) -> SearchResult:
        selector = None
        if filter is not None:
            allowed = np.setdiff1d(np.asarray(filter, dtype=np.int64), self._tombstones)
            if not len(allowed):
                return padded(len(queries), k)
            selector = faiss.IDSelectorBatch(allowed)
        elif len(self._tombstones):
            # IDSelectorNot keeps a pointer to the batch selector: keep both alive until the search ends.
            excluded = faiss.IDSelectorBatch(self._tombstones)
            selector = faiss.IDSelectorNot(excluded)
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.options["ef_search"], k))
        elif self.kind == "ivfpq":
            params = faiss.SearchParametersIVF(sel=selector, nprobe=min(self.options["nprobe"], index.nlist))
        else:
            params = faiss.SearchParameters(sel=selector)
        scores, ids = index.search(queries, k, params=params)
        scores[ids < 0] = -np.inf
        return SearchResult(ids.astype(np.int64), scores.astype(np.float32))

    # --- writing -------------------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors_by_task: dict[str, np.ndarray]) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        check_add(ids, vectors_by_task, self._tasks, self.dim)
        if not len(ids):
            return
        self._limit_threads()
        with self._lock.write():
            first = self._indexes[self._tasks[0]]
            present = np.isin(ids, self._live_ids(self._tasks[0]))
            if present.any():
                raise DuplicateIdError(f"ids already stored: {ids[present][:10].tolist()}")
            if np.isin(ids, self._tombstones).any():
                self._compact()
            untrained = self.kind == "ivfpq" and not first.is_trained
            for task in self._tasks:
                vectors = np.ascontiguousarray(vectors_by_task[task], dtype=np.float32)
                if untrained:
                    self._indexes[task] = self._train_ivfpq(vectors)
                self._indexes[task].add_with_ids(vectors, ids)
            self._mirrors.clear()

    def remove(self, ids: np.ndarray) -> int:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        self._limit_threads()
        with self._lock.write():
            present = ids[np.isin(ids, self._live_ids(self._tasks[0]))]
            if not len(present):
                return 0
            if self.kind == "hnsw":
                self._tombstones = np.union1d(self._tombstones, present)
            else:
                for task in self._tasks:
                    self._indexes[task].remove_ids(faiss.IDSelectorBatch(present))
            self._mirrors.clear()
            return len(present)

    def add_task(self, task: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        """A new task's index, last in task order, holding ``vectors[i]`` under ``ids[i]``: exactly the ids
        the other tasks hold (HNSW tombstones are compacted away first, IVF-PQ trains on ``vectors``).
        In memory: durable with the next snapshot (the gallery takes one at once)."""
        if task in self._tasks:
            raise ValueError(f"task {task!r} is already in the index")
        ids = as_ids(ids)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"vectors have shape {vectors.shape}, expected {(len(ids), self.dim)}")
        self._limit_threads()
        with self._lock.write():
            if len(self._tombstones):
                self._compact()
            check_same_ids(ids, self._live_ids(self._tasks[0]), task)
            first = self._indexes[self._tasks[0]]
            trained = self.kind == "ivfpq" and first.is_trained
            index = self._train_ivfpq(vectors) if trained else self._new_index()
            if len(ids):
                index.add_with_ids(vectors, ids)
            self._indexes[task] = index
            self._tasks.append(task)
            self._mirrors.pop(task, None)

    def remove_task(self, task: str) -> None:
        """Drop ``task``'s index (in memory: durable with the next snapshot); the last task stays."""
        check_task(task, self._tasks)
        if len(self._tasks) == 1:
            raise ValueError(f"{task!r} is the index's only task; an index keeps at least one")
        with self._lock.write():
            self._removed[task] = (
                self._tasks.index(task),
                self._indexes.pop(task),
                self._mirrors.pop(task, None),
            )
            self._tasks.remove(task)

    def restore_task(self, task: str) -> None:
        with self._lock.write():
            position, index, mirror = self._removed.pop(task)
            self._tasks.insert(position, task)
            self._indexes[task] = index
            if mirror is not None:
                self._mirrors[task] = mirror

    def discard_removed(self) -> None:
        """Forget the removed tasks' indexes (kept for ``restore_task``); they live on only in older
        generations, pruned as usual."""
        self._removed.clear()

    def _compact(self) -> None:
        """Rebuild the HNSW graphs without the tombstoned vectors (caller holds the write lock)."""
        for task in self._tasks:
            old = self._indexes[task]
            stored = self._stored_ids(old)
            keep = ~np.isin(stored, self._tombstones)
            vectors = old.index.reconstruct_n(0, old.ntotal)[keep]
            fresh = self._new_index()
            if keep.any():
                fresh.add_with_ids(vectors, stored[keep])
            self._indexes[task] = fresh
        self._tombstones = np.empty(0, dtype=np.int64)
        self._mirrors.clear()

    # --- persistence ---------------------------------------------------------------------------------

    def capture(self) -> FaissSnapshot:
        """An in-memory copy of every task's index (HNSW compacted first when tombstones pile up), taken
        under the read lock: searches go on meanwhile; only writes wait, for the copy (not the disk)."""
        self._limit_threads()
        if self.kind == "hnsw":
            with self._lock.write():
                total = self._indexes[self._tasks[0]].ntotal
                if len(self._tombstones) > self.options["compact_fraction"] * max(total, 1):
                    self._compact()
        with self._lock.read():
            return FaissSnapshot(
                indexes={task: faiss.clone_index(self._indexes[task]) for task in self._tasks},
                tombstones=self._tombstones.copy(),
                options=dict(self.options),
                counts={t: int(self._indexes[t].ntotal) - len(self._tombstones) for t in self._tasks},
            )

    def commit(
        self,
        snapshot: FaissSnapshot,
        *,
        extra: Callable[[Path], None] | None = None,
        log_position: int = 0,
    ) -> Manifest:
        """Write ``snapshot`` as a new generation (no store lock held: the copy is private); ``extra``
        adds files (a gallery's metadata and config) under the same manifest."""

        def write(directory: Path) -> None:
            snapshot.write(directory)
            if extra is not None:
                extra(directory)

        with self._save_lock:
            self.manifest = self.generations.commit(
                write,
                model_hash=self.model_hash,
                embedding_dim=self.dim,
                backend=self.backend,
                tasks=self._tasks,
                counts=snapshot.counts,
                options=snapshot.options,
                log_position=log_position,
            )
            return self.manifest

    def save(self) -> Manifest:
        return self.commit(self.capture())

    def load(self) -> Manifest | None:
        outcome, state = self.generations.load_newest(
            self._read_files, model_hash=self.model_hash, embedding_dim=self.dim
        )
        if state is not None:
            with self._lock.write():
                self._indexes, self._tombstones, self.options = state
                self._mirrors.clear()
                self.manifest = outcome.manifest
        return outcome.manifest

    def _read_files(
        self, manifest: Manifest, directory: Path
    ) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
        if manifest.tasks != self._tasks:
            raise GenerationError(
                f"generation {manifest.generation} holds tasks {manifest.tasks}, the model has {self._tasks}"
            )
        indexes = {
            task: faiss.read_index(str(directory / _task_file(i))) for i, task in enumerate(self._tasks)
        }
        tombstone_file = directory / "tombstones.npy"
        tombstones = np.load(tombstone_file) if tombstone_file.exists() else np.empty(0, dtype=np.int64)
        for task, index in indexes.items():
            if index.ntotal - len(tombstones) != manifest.counts[task]:
                raise GenerationError(f"generation {manifest.generation}: count of {task!r} disagrees")
        return indexes, tombstones.astype(np.int64), {**self.options, **manifest.options}

    def close(self) -> None:
        self._mirrors.clear()


Store = FaissStore  # what index.store.store_class("faiss") returns
