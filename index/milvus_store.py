"""The Milvus backend: one collection per task through pymilvus' ``MilvusClient``.

Two modes, one client API. Milvus Lite: ``uri`` is a ``.db`` file (default ``<root>/gallery.db``), served
inside the process that opens it. Server mode: ``uri`` is a Milvus server's address (standalone or cluster,
e.g. ``http://host:19530``; ``token`` is its ``user:password`` or API key when it checks them), for
galleries that outgrow one machine or replicas that share one set of vectors; no local database file exists
then, and several stores (processes, replicas) may open the same collections at once. Each collection has an
``INT64`` primary key ``id`` and a ``FLOAT_VECTOR`` field ``vector`` indexed for inner product
(``index_type`` ``FLAT`` by default: exact, so it passes the same exactness contract as faiss flat;
``HNSW``, ``IVF_FLAT``, ``IVF_PQ``, ``DISKANN``… with their build parameters in ``index_params``, e.g.
``{"M": 16, "efConstruction": 200}``, and their search parameters in ``search_params``, e.g. ``{"ef":
128}``: approximate). Collections are created with ``Strong`` consistency so that a search sees every
acknowledged add and remove. Collection names are ``<collection_prefix>_<position>_<task, sanitised>``, so
several galleries share one server under different prefixes (a prefix names one gallery's collections: two
galleries under one prefix would be one set of vectors). The backend needs the ``milvus`` extra (pymilvus,
and milvus-lite for a ``.db`` uri); without it, opening a store raises ``BackendUnavailableError`` naming
it. This module imports neither faiss nor, until a store is opened, pymilvus.

Filters become a primary-key expression ``id in [...]`` evaluated inside Milvus. (For very large allowed
sets on a cluster, the labels would better be scalar fields of the collection; the metadata layer keeps
them in SQLite for now so every backend filters the same way.)

What a generation means here: Milvus persists its own data (its write-ahead log, flushed segments), so writes
are durable once acknowledged, and a generation cannot roll Milvus back. ``save`` flushes every collection and
then commits a generation (``index.generations``) whose only file, ``collections.json``, records the uri
(without credentials) and collection names; its manifest records model hash, embedding size, metric and the
count per task. In server mode the generations stay files under ``root`` (the gallery directory) while the
vectors live on the server: a generation is then a checkpoint of which collections the gallery uses and how
many vectors each held, not a copy of them. Opening a store loads every collection into memory
(``load_collection``): collections of a Milvus Lite file opened by another process, or of a restarted cluster,
start out released and refuse searches until loaded. ``load`` serves the newest manifest that verifies and
matches the model (falling back as for faiss) and checks that every collection exists; counts may legitimately
have moved on since the last save, so ``Gallery.verify`` compares them against the metadata rather than the
manifest. A collection that does not exist is created when the store opens, so a new gallery starts empty; a
generation that counted vectors in a collection this open had to create is refused (the uri or prefix points
at another server or gallery, or the collections were dropped), so that a typo in the address can never make
the gallery's repair roll back its metadata against empty collections. With a Milvus Lite file ``save``
excludes searches while it flushes (Lite's flush is not isolated from a concurrent search, which can miss the
rows being flushed). Milvus does not apply one insert to several collections atomically: a crash inside
``add`` can leave an id in some tasks only, which ``Gallery`` repairs on open (see ``index.gallery``).

``get`` (stored vectors by id) is Milvus' primary-key ``get`` with the ``vector`` field: exact copies.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from index.generations import GenerationError, Generations, Manifest
from index.rwlock import RWLock
from index.store import (
    BackendUnavailableError,
    DuplicateIdError,
    SearchResult,
    StoreUnavailable,
    UnknownIdError,
    as_ids,
    as_queries,
    check_add,
    check_same_ids,
    check_task,
    padded,
)

INSTALL_HINT = "pip install modret[milvus]"
MAX_LIMIT = 16384  # Milvus' cap on topk
INDEX_WAIT_S = 10.0  # how long a store waits for another one to index a collection it created
_CHUNK = 10_000  # rows per insert / ids per expression, well under Milvus' message size limit
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
T = TypeVar("T")


def _safe_uri(uri: str) -> str:
    """``uri`` without any ``user:password@`` (what gets written to files and error messages)."""
    parts = urlsplit(uri)
    if parts.scheme and parts.password is not None:
        host = parts.hostname or ""
        return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))
    return uri


def _id_expr(ids: np.ndarray) -> str:
    return f"id in [{','.join(str(int(i)) for i in ids)}]"


class _Guarded:
    """A ``MilvusClient`` whose failures are ``StoreUnavailable`` naming the server (never its token), so
    that an engine away is a retryable 503 at the API edge, not an internal error."""

    def __init__(self, client: Any, where: str) -> None:
        from pymilvus.exceptions import MilvusException

        self._client, self._where, self._errors = client, where, (MilvusException,)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except self._errors as e:
                raise StoreUnavailable(f"Milvus at {self._where}: {name} failed: {e}") from e

        return call


class MilvusStore:
    backend = "milvus"

    def __init__(
        self,
        root: Path,
        *,
        tasks: list[str],
        dim: int,
        model_hash: str,
        uri: str | None = None,
        token: str | None = None,
        collection_prefix: str = "modret",
        index_type: str = "FLAT",
        index_params: dict[str, Any] | None = None,
        search_params: dict[str, Any] | None = None,
        collections: dict[str, str] | None = None,
    ) -> None:
        try:  # optional dependency (the ``milvus`` extra): imported only when this backend is used
            from pymilvus import MilvusClient
        except ImportError as e:
            raise BackendUnavailableError(
                f"the milvus backend needs pymilvus, which is not installed ({e}): {INSTALL_HINT}"
            ) from e
        if not _NAME.fullmatch(collection_prefix):
            raise ValueError(f"collection_prefix {collection_prefix!r} must match {_NAME.pattern}")
        self.root = root
        self.dim = dim
        self.model_hash = model_hash
        self._tasks = list(tasks)
        root.mkdir(parents=True, exist_ok=True)
        self.uri = uri or str(root / "gallery.db")
        self.lite = self.uri.endswith(".db")  # pymilvus' own rule: a .db uri is a Milvus Lite file
        if self.lite and importlib.util.find_spec("milvus_lite") is None:
            raise BackendUnavailableError(
                f"the Milvus Lite file {self.uri} needs milvus-lite, which is not installed: {INSTALL_HINT}"
            )
        # What the manifest records: no uri (it is where the gallery is served from, which a deployment
        # may change: see service.settings) and never the token.
        self.options: dict[str, Any] = {"collection_prefix": collection_prefix, "index_type": index_type}
        if index_params:
            self.options["index_params"] = dict(index_params)
        if search_params:
            self.options["search_params"] = dict(search_params)
        self.collections = {task: self.collection_name(i, task) for i, task in enumerate(self._tasks)}
        if collections is not None:  # recorded by a task change (``add_task``/``remove_task``)
            if list(collections) != self._tasks:
                raise ValueError(f"collections {collections} do not name the tasks {self._tasks} in order")
            self.collections = dict(collections)
            self.options["collections"] = dict(collections)
        self.generations = Generations(root)
        self.manifest: Manifest | None = None
        self._lock = RWLock()
        self._retired: list[str] = []  # collections of removed tasks, dropped by discard_removed
        self._removed: dict[str, tuple[int, str]] = {}  # task -> (position, collection), for restore_task
        try:
            client = MilvusClient(uri=self.uri, token=token or "")
        except Exception as e:  # pymilvus raises MilvusException (or grpc's errors) when it cannot connect
            if self.lite:
                raise
            raise ConnectionError(f"cannot reach the Milvus server at {_safe_uri(self.uri)}: {e}") from e
        self._client: Any = _Guarded(client, _safe_uri(self.uri))
        # Creating and loading a collection takes seconds on a server (index build, channel assignment):
        # there the collections open side by side; a Lite file serves one request at a time anyway.
        created = self._each_collection(self._open_collection)
        # The collections this open created: no generation can have counted vectors in them.
        self._created = {c for c, new in zip(self.collections.values(), created, strict=True) if new}

    def _each_collection(self, call: Callable[[str], T]) -> list[T]:
        """``call(collection)`` for every collection in task order: one after another on a Lite file
        (which serves one request at a time anyway), side by side on a server."""
        names = list(self.collections.values())
        if self.lite or len(names) < 2:
            return [call(c) for c in names]
        with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
            return list(pool.map(call, names))

    def _open_collection(self, collection: str) -> bool:
        """Create ``collection`` when it does not exist, then load it; whether this call created it."""
        created = False
        if not self._client.has_collection(collection):
            try:
                self._create(collection)
                created = True
            except Exception:
                if not self._client.has_collection(collection):
                    raise
                # another store (a replica opening the same new gallery) created it meanwhile
        if not created and not self.lite:
            self._await_index(collection)
        # A collection that exists from an earlier process (or a restarted server) starts released:
        # searches, queries and gets fail until it is loaded. Loading a loaded collection is a no-op.
        self._client.load_collection(collection)
        return created

    def _await_index(self, collection: str) -> None:
        """A collection is created first and indexed a moment later, and cannot be loaded in between: when
        another store (a replica) is creating it, wait for its index; when none comes (its creator
        crashed in between), create the index here."""
        deadline = time.monotonic() + INDEX_WAIT_S
        while not self._client.list_indexes(collection):
            if time.monotonic() > deadline:
                try:
                    self._client.create_index(collection, self._index_params())
                except Exception:
                    if not self._client.list_indexes(collection):
                        raise
                return
            time.sleep(0.1)

    def collection_name(self, position: int, task: str) -> str:
        """The collection of ``task`` at ``position`` in task order: ``<prefix>_<position>_<task>``."""
        prefix = self.options["collection_prefix"]
        return f"{prefix}_{position:03d}_{re.sub(r'[^A-Za-z0-9_]', '_', task)}"[:255]

    def _create(self, collection: str) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        self._client.create_collection(
            collection, schema=schema, index_params=self._index_params(), consistency_level="Strong"
        )

    def _index_params(self) -> Any:
        index_params = self._client.prepare_index_params()
        index_params.add_index(
            field_name="vector",
            index_type=self.options["index_type"],
            metric_type="IP",
            params=self.options.get("index_params", {}),
        )
        return index_params

    def tasks(self) -> list[str]:
        return list(self._tasks)

    def _count(self, task: str) -> int:
        rows = self._client.query(self.collections[task], filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def _present(self, task: str, ids: np.ndarray) -> np.ndarray:
        found: list[int] = []
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            rows = self._client.query(self.collections[task], filter=_id_expr(chunk), output_fields=["id"])
            found += [int(r["id"]) for r in rows]
        return np.array(sorted(found), dtype=np.int64)

    def count(self, task: str) -> int:
        check_task(task, self._tasks)
        with self._lock.read():
            return self._count(task)

    def ids(self, task: str) -> np.ndarray:
        check_task(task, self._tasks)
        with self._lock.read():
            iterator = self._client.query_iterator(
                self.collections[task], batch_size=_CHUNK, filter="", output_fields=["id"]
            )
            found: list[int] = []
            while rows := iterator.next():
                found += [int(r["id"]) for r in rows]
            iterator.close()
            return np.array(sorted(found), dtype=np.int64)

    def get(self, task: str, ids: np.ndarray) -> np.ndarray:
        check_task(task, self._tasks)
        ids = as_ids(ids)
        wanted = np.unique(ids)
        rows: dict[int, list[float]] = {}
        with self._lock.read():
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK].tolist()
                for row in self._client.get(self.collections[task], ids=chunk, output_fields=["vector"]):
                    rows[int(row["id"])] = row["vector"]
        missing = [i for i in wanted.tolist() if i not in rows]
        if missing:
            raise UnknownIdError(np.array(missing, dtype=np.int64), task)
        vectors = np.empty((len(ids), self.dim), dtype=np.float32)
        for position, i in enumerate(ids.tolist()):
            vectors[position] = rows[i]
        return vectors

    def search(
        self, task: str, queries: np.ndarray, k: int, filter: np.ndarray | None = None, where: str = ""
    ) -> SearchResult:
        """The contract's search; ``where`` (a Milvus expression over the collection's scalar fields, e.g.
        ``index.milvus_labels.label_expression``) further restricts the hits."""
        check_task(task, self._tasks)
        queries = as_queries(queries, self.dim)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        result = padded(len(queries), k)
        if not len(queries) or (filter is not None and len(filter) == 0):
            return result
        parts = [f"({where})"] if where else []
        if filter is not None:
            parts.append(_id_expr(np.unique(filter)))
        with self._lock.read():
            limit = self._limit(task, k)
            if limit == 0:
                return result
            hits = self._client.search(
                self.collections[task],
                data=list(queries),
                limit=limit,
                filter=" and ".join(parts),
                output_fields=["id"],
                search_params={"metric_type": "IP", "params": self.options.get("search_params", {})},
            )
        for row, row_hits in enumerate(hits):
            for col, hit in enumerate(row_hits):
                result.ids[row, col] = int(hit["id"])
                result.scores[row, col] = float(hit["distance"])
        return result

    def _limit(self, task: str, k: int) -> int:
        """The topk a search asks for: at most the rows ``task`` holds (0: nothing to search)."""
        return min(k, self._count(task), MAX_LIMIT)

    def add(self, ids: np.ndarray, vectors_by_task: dict[str, np.ndarray]) -> None:
        self._insert(ids, vectors_by_task)

    def _insert(
        self,
        ids: np.ndarray,
        vectors_by_task: dict[str, np.ndarray],
        fields: list[dict[str, Any]] | None = None,
    ) -> None:
        """``add``, each row also holding ``fields[i]`` (a subclass's scalar fields) when given."""
        ids = np.asarray(ids, dtype=np.int64)
        check_add(ids, vectors_by_task, self._tasks, self.dim)
        if not len(ids):
            return
        extra = fields if fields is not None else [{} for _ in range(len(ids))]
        with self._lock.write():
            present = self._present(self._tasks[0], ids)
            if len(present):
                raise DuplicateIdError(f"ids already stored: {present[:10].tolist()}")
            for task in self._tasks:
                vectors = np.asarray(vectors_by_task[task], dtype=np.float32)
                for start in range(0, len(ids), _CHUNK):
                    chunk = slice(start, start + _CHUNK)
                    rows = [
                        {"id": int(i), "vector": v, **more}
                        for i, v, more in zip(ids[chunk], vectors[chunk], extra[chunk], strict=True)
                    ]
                    self._client.insert(self.collections[task], rows)

    def remove(self, ids: np.ndarray) -> int:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if not len(ids):
            return 0
        with self._lock.write():
            present = self._present(self._tasks[0], ids)
            for task in self._tasks:
                # Every task, not only the first one's hits: a crash inside ``add`` may have left an id
                # in later tasks only.
                for start in range(0, len(ids), _CHUNK):
                    self._client.delete(self.collections[task], ids=ids[start : start + _CHUNK].tolist())
            return len(present)

    def add_task(self, task: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        """A new collection for ``task`` (last in task order) holding ``vectors[i]`` under ``ids[i]``,
        flushed before it returns. A collection of that name left by an add that crashed is dropped first.
        The caller serialises this with writes (``Gallery`` does): the ids are compared outside the lock."""
        if task in self._tasks:
            raise ValueError(f"task {task!r} is already in the index")
        ids = as_ids(ids)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"vectors have shape {vectors.shape}, expected {(len(ids), self.dim)}")
        check_same_ids(ids, self.ids(self._tasks[0]), task)
        collection = self.collection_name(len(self._tasks), task)
        with self._lock.write():
            if collection in self._retired:
                self._retired.remove(collection)
            if self._client.has_collection(collection):
                self._client.drop_collection(collection)
            self._create(collection)
            self._client.load_collection(collection)
            try:
                for start in range(0, len(ids), _CHUNK):
                    chunk = zip(ids[start : start + _CHUNK], vectors[start : start + _CHUNK], strict=True)
                    self._client.insert(collection, [{"id": int(i), "vector": v} for i, v in chunk])
                self._client.flush(collection)
            except BaseException:
                self._client.drop_collection(collection)
                raise
            self.collections[task] = collection
            self._tasks.append(task)
            self.options["collections"] = dict(self.collections)

    def remove_task(self, task: str) -> None:
        """Forget ``task``'s collection; it is dropped by ``discard_removed``, once the gallery's config
        no longer names it. The other collections keep their names (recorded in ``options`` as
        ``collections``, which the gallery keeps in its store options). The last task stays."""
        check_task(task, self._tasks)
        if len(self._tasks) == 1:
            raise ValueError(f"{task!r} is the index's only task; an index keeps at least one")
        with self._lock.write():
            collection = self.collections.pop(task)
            self._retired.append(collection)
            self._removed[task] = (self._tasks.index(task), collection)
            self._tasks.remove(task)
            self.options["collections"] = dict(self.collections)

    def restore_task(self, task: str) -> None:
        with self._lock.write():
            position, collection = self._removed.pop(task)
            self._retired.remove(collection)
            self._tasks.insert(position, task)
            self.collections = {t: collection if t == task else self.collections[t] for t in self._tasks}
            self.options["collections"] = dict(self.collections)

    def discard_removed(self) -> None:
        """Drop the collections of the tasks removed since the last call."""
        with self._lock.write():
            self._removed.clear()
            while self._retired:
                collection = self._retired.pop()
                if self._client.has_collection(collection):
                    self._client.drop_collection(collection)

    def save(self) -> Manifest:
        # Milvus Lite's flush is not isolated from searches that run meanwhile: one can miss the rows
        # being flushed (tests/index/test_concurrency.py caught it). With a Lite file the save therefore
        # excludes searches (it takes milliseconds there); a server's flush runs beside them, and its
        # collections flush side by side (a second or so each: it seals segments into object storage).
        lock = self._lock.write if self.lite else self._lock.read
        with lock():
            self._each_collection(self._client.flush)
            self.manifest = self.generations.commit(
                self._write_files,
                model_hash=self.model_hash,
                embedding_dim=self.dim,
                backend=self.backend,
                tasks=self._tasks,
                counts={task: self._count(task) for task in self._tasks},
                options=self.options,
            )
            self._created.clear()  # the generation just committed counted them: a later load may serve it
        return self.manifest

    def _write_files(self, directory: Path) -> None:
        record = {"uri": _safe_uri(self.uri), "collections": self.collections}
        (directory / "collections.json").write_text(json.dumps(record, indent=2))

    def load(self) -> Manifest | None:
        outcome, _ = self.generations.load_newest(
            self._check_collections, model_hash=self.model_hash, embedding_dim=self.dim
        )
        self.manifest = outcome.manifest
        return outcome.manifest

    def _check_collections(self, manifest: Manifest, directory: Path) -> None:
        record = json.loads((directory / "collections.json").read_text())
        if manifest.tasks != self._tasks or record["collections"] != self.collections:
            raise GenerationError(
                f"generation {manifest.generation} describes collections {record['collections']}, "
                f"expected {self.collections}"
            )
        missing = [c for c in self.collections.values() if not self._client.has_collection(c)]
        if missing:
            raise GenerationError(
                f"generation {manifest.generation}: collections missing in Milvus: {missing}"
            )
        emptied = {
            c: manifest.counts.get(task, 0)
            for task, c in self.collections.items()
            if c in self._created and manifest.counts.get(task, 0)
        }
        if emptied:
            raise GenerationError(
                f"generation {manifest.generation} counted vectors in collections that do not exist at "
                f"{_safe_uri(self.uri)} (created empty now): {emptied}; is the uri or collection prefix "
                "the gallery's?"
            )

    def close(self) -> None:
        self._client.close()


Store = MilvusStore  # what index.store.store_class("milvus") returns
