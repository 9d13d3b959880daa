"""A gallery that several replicas serve at once: metadata in PostgreSQL, vectors on a Milvus server (#14).

What a replica keeps of its own: nothing. There is no gallery directory, ``gallery.json``, writer lock or
write-ahead log; every replica opens the same two engines:

- **PostgreSQL** (``index.postgres_metadata``, ``MODRET_METADATA_URL``): the items (ids, content hashes,
  labels, pending/committed), the image bytes (bytea) and the gallery config — tasks, embedding size, model
  hash, per-task fingerprints, store options (``collection_prefix``, ``index_type``) — in its ``gallery``
  table. The first replica to open an empty database with ``create`` (``MODRET_CREATE_INDEX``) records the
  config of its run (first writer wins); every replica checks its run against the recorded one
  (``index.tasks.check_model``: the model hash, or the per-task fingerprints, so a child run of
  ``modret task add`` serves the tasks it embeds as indexed) and its embedding size.
- **Milvus** (``index.milvus_labels``, ``MODRET_MILVUS_URI``): one collection per task,
  ``<prefix>_<position>_<task>``, each row with the item's labels (a JSON field), so a label filter is a
  Milvus expression and never a list of ids. The prefix defaults to the PostgreSQL schema's name (one
  gallery, one name); ``MODRET_MILVUS_COLLECTION_PREFIX``, when set, must be the recorded one.

Writes go through ``index.replica_writes``: an add commits pending rows, inserts the vectors (with their
labels) into every task's collection, then commits the rows; a remove deletes the rows, then the vectors.
An add's ids are committed, durable in both engines, when ``insert`` returns. Duplicates are found by
content hash in PostgreSQL, across replicas.

Readers never see a pending or half-inserted item: PostgreSQL's reads return committed items only, and a
search drops the ids Milvus returns whose row is missing (a remove between its two steps) or pending (an
add between them), searching deeper until it has ``k`` visible hits or Milvus has no more.

Repair (``index.replica_writes.repair``): on open, what crashed replicas left — pending rows older than
``repair_after_s`` (committed when every task holds their vectors, else rolled back) and vectors without a
row (removed) — and in the background every ``repair_every_s`` the pending rows alone (a content whose
add crashed would otherwise wait for the next start before it can be added again); ``modret index
repair`` runs the same pass on demand (``--older-than 0`` once no replica is writing).

Blocking: every call does network round trips; the service calls it from worker threads.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from index import replica_writes
from index.checks import check_model_match
from index.committer import AddResult
from index.gallery import GalleryInfo
from index.gallery_files import GalleryError, VerifyReport
from index.metadata import ItemRecord, MetadataError, NewItem
from index.milvus_labels import LabelledMilvusStore, label_expression, normalised
from index.milvus_store import MAX_LIMIT, _safe_uri
from index.postgres_metadata import PostgresMetadata
from index.served import ConfigView, LabelFilter, SearchFilter
from index.store import PAD_ID, SearchResult, as_ids, padded
from index.tasks import TaskCheck, check_model, recorded_fingerprints
from model.data.base import LabelValue
from model.tasks import Fingerprints

log = logging.getLogger(__name__)

BACKEND = "milvus"
REPAIR_AFTER_S = replica_writes.REPAIR_AFTER_S
REPAIR_EVERY_S = 60.0
_SLACK = 8  # hits asked beyond k, for ids a search drops (pending or being removed)
T = TypeVar("T")


def _engine_errors() -> tuple[type[BaseException], ...]:
    """What the engines raise when they fail (unreachable, refusing): a ``GalleryError`` for the caller."""
    errors: list[type[BaseException]] = [MetadataError, replica_writes.ReplicaWriteError, ConnectionError]
    try:
        from pymilvus.exceptions import MilvusException

        errors.append(MilvusException)
    except ImportError:  # pragma: no cover - the milvus extra is what this module runs on
        pass
    return tuple(errors)


class SharedGallery(ConfigView):
    """See the module docstring; open with ``SharedGallery.open``."""

    def __init__(
        self,
        metadata: PostgresMetadata,
        store: LabelledMilvusStore,
        config: dict[str, Any],
        *,
        root: Path,
        scratch: Path,
        read_only: bool = False,
        repair_after_s: float = REPAIR_AFTER_S,
    ) -> None:
        self.root = root  # the replica's index directory setting: only named in messages
        self._metadata = metadata
        self._store = store
        self.config = config
        self.read_only = read_only
        self.where = f"{metadata.where} + Milvus {_safe_uri(store.uri)}"
        self.task_check: TaskCheck | None = None
        self.repairs: list[str] = []
        self.repair_after_s = repair_after_s
        self._scratch = scratch  # the store's (empty) generations directory: nothing is saved there
        self._errors = _engine_errors()
        self._stop = threading.Event()
        self._repairer: threading.Thread | None = None

    # --- the contract's attributes (index.served) ------------------------------------------------------

    @property
    def store(self) -> LabelledMilvusStore:
        return self._store

    @property
    def metadata(self) -> PostgresMetadata:
        return self._metadata

    # --- opening -------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        metadata_url: str,
        *,
        milvus_uri: str | None,
        milvus_token: str | None = None,
        collection_prefix: str | None = None,
        root: Path | None = None,
        create: bool = False,
        tasks: Sequence[str] | None = None,
        dim: int | None = None,
        model_hash: str | None = None,
        fingerprints: Fingerprints | None = None,
        index_type: str = "FLAT",
        read_only: bool = False,
        repair: bool = True,
        repair_after_s: float = REPAIR_AFTER_S,
        repair_every_s: float | None = REPAIR_EVERY_S,
    ) -> SharedGallery:
        """Open the shared gallery of ``metadata_url`` with its vectors on ``milvus_uri``. ``create``: an
        empty database gets the config of ``tasks``/``dim``/``model_hash``/``fingerprints`` (the run's)
        unless another replica recorded one first. ``model_hash``/``fingerprints`` are checked against the
        recorded config as ``Gallery.open`` checks gallery.json. ``repair`` runs the repair pass once
        (writers only), ``repair_every_s`` the pending-rows pass in the background (None: never)."""
        if milvus_uri is None:
            raise GalleryError(
                "a gallery whose metadata is in PostgreSQL keeps its vectors on a Milvus server: set "
                "MODRET_MILVUS_URI=http://host:19530"
            )
        try:
            metadata = PostgresMetadata(metadata_url, create=create and not read_only, read_only=read_only)
        except MetadataError as e:
            raise GalleryError(str(e)) from None
        scratch: Path | None = None
        store: LabelledMilvusStore | None = None
        try:
            config = cls._config(metadata, create, tasks, dim, model_hash, fingerprints, index_type)
            where = metadata.where
            task_check = check_model(Path(metadata.schema), config, model_hash, fingerprints)
            if dim is not None and dim != int(config["embedding_dim"]):
                raise GalleryError(
                    f"the gallery at {where} holds {config['embedding_dim']}-dimensional vectors, the model "
                    f"makes {dim}: use a gallery (schema) of its own"
                )
            options = config["store_options"]
            if collection_prefix is not None and collection_prefix != options["collection_prefix"]:
                raise GalleryError(
                    f"the gallery at {where} keeps its vectors under the collection prefix "
                    f"{options['collection_prefix']!r}, not {collection_prefix!r} "
                    "(MODRET_MILVUS_COLLECTION_PREFIX): unset it, or point the metadata URL at its gallery"
                )
            scratch = Path(tempfile.mkdtemp(prefix="modret-shared-"))
            try:
                store = LabelledMilvusStore(
                    scratch,
                    tasks=list(config["tasks"]),
                    dim=int(config["embedding_dim"]),
                    model_hash=str(config["model_hash"]),
                    uri=milvus_uri,
                    token=milvus_token,
                    collection_prefix=str(options["collection_prefix"]),
                    index_type=str(options.get("index_type", "FLAT")),
                    index_params=options.get("index_params"),
                    search_params=options.get("search_params"),
                )
            except (ConnectionError, ValueError) as e:
                raise GalleryError(str(e)) from None
            gallery = cls(
                metadata,
                store,
                config,
                root=root or Path.cwd(),
                scratch=scratch,
                read_only=read_only,
                repair_after_s=repair_after_s,
            )
        except BaseException:
            if store is not None:
                store.close()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            metadata.close()
            raise
        gallery.task_check = task_check
        try:
            if repair and not read_only:
                gallery.repairs = gallery.repair(older_than_s=repair_after_s).describe()
            if repair_every_s is not None and not read_only:
                gallery._start_repairer(repair_every_s)
        except BaseException:
            gallery.close()
            raise
        return gallery

    @staticmethod
    def _config(
        metadata: PostgresMetadata,
        create: bool,
        tasks: Sequence[str] | None,
        dim: int | None,
        model_hash: str | None,
        fingerprints: Fingerprints | None,
        index_type: str,
    ) -> dict[str, Any]:
        """The recorded gallery config; with ``create``, the run's recorded first where none is."""
        recorded = metadata.config()
        if recorded is not None:
            return recorded
        if not create:
            raise GalleryError(
                f"{metadata.where} holds no gallery yet: start the first replica with "
                "MODRET_CREATE_INDEX=true"
            )
        if tasks is None or dim is None or model_hash is None:
            raise GalleryError(f"{metadata.where}: creating a gallery needs the run's tasks, size and hash")
        config: dict[str, Any] = {
            "format_version": 1,
            "backend": BACKEND,
            "store_options": {
                "collection_prefix": metadata.schema,
                "index_type": index_type,
                "labels": "json",
            },
            "tasks": list(tasks),
            "embedding_dim": int(dim),
            "model_hash": model_hash,
        }
        if fingerprints is not None:
            config["fingerprints"] = {
                "shared": fingerprints.shared,
                "tasks": {task: fingerprints.tasks[task] for task in tasks},
            }
        return metadata.save_config(config)  # first writer wins: another replica's, if it was first

    def _start_repairer(self, every_s: float) -> None:
        def loop() -> None:
            while not self._stop.wait(every_s):
                try:
                    replica_writes.repair(
                        self._metadata,
                        self._store,
                        self.tasks,
                        older_than_s=self.repair_after_s,
                        orphans=False,
                    )
                except Exception:  # an engine away for a while: the next pass tries again
                    log.exception("background repair of %s failed", self.where)

        self._repairer = threading.Thread(target=loop, name="modret-repair", daemon=True)
        self._repairer.start()

    # --- writing -------------------------------------------------------------------------------------

    def _engine(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, with the engines' failures as a ``GalleryError`` naming ``what`` failed."""
        try:
            return call()
        except self._errors as e:
            raise GalleryError(f"{what} on {self.where} failed: {e}") from e

    def _check_writable(self) -> None:
        if self.read_only:
            raise GalleryError(f"{self.where} is open read-only")

    def insert(self, items: Sequence[NewItem], vectors: np.ndarray) -> AddResult:
        """Add ``items`` with their (N, T, D) ``vectors`` in task order: committed in PostgreSQL and stored
        in every task's collection on return (``index.replica_writes.add``)."""
        self._check_writable()
        expected = (len(items), len(self.tasks), self.embedding_dim)
        if vectors.shape != expected:
            raise ValueError(f"vectors have shape {vectors.shape}, expected {expected}")
        for item in items:
            normalised(item.labels)  # what Milvus cannot filter on is refused before anything is written
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids, new = self._engine(
            "an add",
            lambda: replica_writes.add(
                self._metadata, self._store, self.tasks, items, vectors, labelled=True
            ),
        )
        return AddResult(ids, new)

    def add(self, items: Sequence[NewItem], vectors: np.ndarray) -> list[int]:
        return self.insert(items, vectors).ids

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove ``ids``: rows first, then vectors. Returns how many rows there were."""
        self._check_writable()
        wanted = as_ids(ids)
        return self._engine("a remove", lambda: replica_writes.remove(self._metadata, self._store, wanted))

    def repair(self, *, older_than_s: float | None = None, orphans: bool = True) -> replica_writes.Repair:
        """One repair pass (``index.replica_writes.repair``); ``modret index repair``."""
        self._check_writable()
        limit = self.repair_after_s if older_than_s is None else older_than_s
        return self._engine(
            "a repair",
            lambda: replica_writes.repair(
                self._metadata, self._store, self.tasks, older_than_s=limit, orphans=orphans
            ),
        )

    # --- reading -------------------------------------------------------------------------------------

    def label_filter(self, conditions: Mapping[str, LabelValue]) -> LabelFilter:
        """``conditions`` as a Milvus expression; ``UnknownLabelError`` for a name no item has."""
        wanted = normalised(conditions)
        unknown = self._metadata.unknown_labels(list(wanted))
        if unknown:
            raise self._metadata.unknown_label_error(unknown[0])
        return LabelFilter(wanted, expression=label_expression(wanted))

    def search(self, task: str, queries: np.ndarray, k: int, filter: SearchFilter = None) -> SearchResult:
        """Top ``k`` visible ids and cosine scores under ``task``; ``filter`` (label ``name == value``)
        runs inside Milvus."""
        if not isinstance(filter, LabelFilter):
            filter = self.label_filter(filter) if filter else None
        where = filter.expression if filter else ""
        limit = k + _SLACK
        while True:
            found = self._store.search(task, queries, min(limit, MAX_LIMIT), where=where)
            result, short = self._visible(found, k)
            if not short or limit >= MAX_LIMIT:
                return result
            limit *= 4

    def _visible(self, found: SearchResult, k: int) -> tuple[SearchResult, bool]:
        """``found`` without the ids a reader may not see, cut to ``k``; and whether some row came out
        short although Milvus had more to give (every slot it was asked for held a hit)."""
        hit_ids = np.unique(found.ids[found.ids != PAD_ID])
        states = self._metadata.states(hit_ids)
        visible = {i for i, state in states.items() if state == "committed"}
        result = padded(len(found.ids), k)
        short = False
        for row in range(len(found.ids)):
            kept = [
                (int(i), float(s))
                for i, s in zip(found.ids[row], found.scores[row], strict=True)
                if i in visible
            ]
            kept = kept[:k]
            for col, (i, score) in enumerate(kept):
                result.ids[row, col] = i
                result.scores[row, col] = score
            if len(kept) < k and (found.ids[row] != PAD_ID).all():
                short = True
        return result, short

    def vectors(self, ids: Sequence[int] | np.ndarray, task: str) -> np.ndarray:
        """The stored (n, D) embeddings of ``ids`` under ``task`` (``UnknownIdError`` for ids without)."""
        return self._store.get(task, as_ids(ids))

    def items(self, ids: Sequence[int] | np.ndarray) -> dict[int, ItemRecord]:
        """The committed items among ``ids``."""
        return self._metadata.get(ids)

    def image_bytes(self, item: ItemRecord) -> bytes | None:
        return self._metadata.read_blob(item.content_hash) if item.has_blob else None

    def info(self) -> GalleryInfo:
        return GalleryInfo(
            root=self.root,
            backend=f"{BACKEND} server + PostgreSQL",
            options={
                **self.config["store_options"],
                "uri": _safe_uri(self._store.uri),
                "metadata": self._metadata.where,
            },
            tasks=self.tasks,
            counts={task: self._store.count(task) for task in self.tasks},
            items=self._metadata.count(),
            model_hash=self.model_hash,
            embedding_dim=self.embedding_dim,
            generation=None,
            sizes={},
            rejected_generations=[],
            fingerprints=recorded_fingerprints(self.config) is not None,
        )

    def verify(self, model_hash: str | None = None, fingerprints: Fingerprints | None = None) -> VerifyReport:
        """The model match, the metadata database, pending rows a repair should see to, every committed
        id in every collection with the labels PostgreSQL holds, and no vector without a row."""
        report = VerifyReport()
        check_model_match(report, self.config, model_hash, fingerprints)
        status = self._metadata.quick_check()
        if status != "ok":
            report.problems.append(f"metadata: {status}")
            return report
        report.checked.append(f"metadata at {self._metadata.where}")
        stale = self._metadata.pending(self.repair_after_s)
        if stale:
            report.problems.append(
                f"{len(stale)} pending items older than {self.repair_after_s:g} s (a crashed add, e.g. id "
                f"{stale[0].id}): run `modret index repair`"
            )
        known = self._metadata.ids()
        with_rows = self._metadata.ids(include_pending=True)
        records = self._metadata.get(known)
        for task in self.tasks:
            stored = self._store.ids(task)
            missing = np.setdiff1d(known, stored)
            extra = np.setdiff1d(stored, with_rows)
            if len(missing):
                report.problems.append(
                    f"task {task!r}: {len(missing)} ids missing, e.g. {missing[:5].tolist()}"
                )
            if len(extra):
                report.problems.append(
                    f"task {task!r}: {len(extra)} vectors without a metadata row, e.g. "
                    f"{extra[:5].tolist()}: run `modret index repair`"
                )
            labels = self._store.labels(task, np.intersect1d(known, stored))
            differ = [i for i, lab in labels.items() if lab != normalised(records[i].labels)]
            if differ:
                report.problems.append(
                    f"task {task!r}: {len(differ)} items whose labels in Milvus differ from PostgreSQL's, "
                    f"e.g. {differ[:5]}"
                )
        report.checked.append(f"{len(known)} ids in each of {len(self.tasks)} collections, with their labels")
        return report

    def close(self, *, snapshot: bool = True) -> None:
        """Stop the background repair and let the engines go (``snapshot``: nothing to snapshot)."""
        self._stop.set()
        if self._repairer is not None:
            self._repairer.join(timeout=30)
        try:
            self._store.close()
        finally:
            self._metadata.close()
            shutil.rmtree(self._scratch, ignore_errors=True)
