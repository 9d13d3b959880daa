"""A gallery: metadata + one vector store + the model it was embedded with, behind one facade.

Layout of a gallery directory::

    gallery.json     backend, store options, tasks, embedding size, model hash, fingerprints (written last)
    gallery.sqlite   metadata (index.metadata), WAL mode
    blobs/           uploaded image bytes, content-addressed
    log/             the write-ahead log (index.wal): faiss galleries only
    store/           the vector store's generations (index.generations), or its Milvus Lite file
    writer.lock      flock held by the one process that opened the gallery for writing

Galleries whose store can snapshot itself in memory (faiss) write through a write-ahead log: an add or a
remove is durable, visible and answered once its log record is fsynced (``index.committer`` groups
concurrent writers into one fsync). A snapshot is a generation holding the vectors *and* copies of the
metadata (``metadata.sqlite``) and of ``gallery.json``, all under the manifest's checksums, plus the log
position it covers; snapshots are taken in the background (``snapshot_every_records`` /
``snapshot_every_s``), by ``save()`` (``modret index compact``) and on ``close``. The log keeps every
record after the oldest kept generation, so falling back to the previous generation (when the newest one
is damaged) loses nothing: it is replayed forward.

Opening replays: the vectors are the newest verified generation plus the records after its position, the
metadata is ``gallery.sqlite`` plus the records after the position it last applied. The two must then
agree; nothing is "repaired" by deleting vectors or rows. A damaged ``gallery.json``, a missing, emptied,
replaced or unreadable ``gallery.sqlite``, metadata that the log cannot bring up to date, or a log damaged
before its end refuse to open with one line saying what is damaged and how to recover:
``Gallery.recover`` (``modret index recover``) restores the config and rebuilds the metadata from the
newest snapshot's copies and the log, keeping the damaged files beside them (``*.damaged-<time>``).

Read-only opens (``info``, ``verify`` beside a running service) hold the generations' shared lock while
they read, so a snapshot cannot delete log segments under them, and replay only up to the position the
metadata shows, so both halves describe the same moment.

Opening with a run: a gallery recording per-task fingerprints accepts a run that embeds its tasks as when
indexed (``index.tasks.check_model``: a child run of ``modret task add``/``remove``, its new tasks in
``task_check.missing``), refusing other shared weights or a task embedded differently; one without them
needs the exact model hash. ``change_tasks`` (``index add-task``/``remove-task``), writes paused: the store
gains or drops a task's index, a snapshot with the new config is committed, gallery.json replaced
atomically, a second snapshot committed. A crash before the replace leaves the old tasks, as they were.

Milvus galleries persist through Milvus' own log: the metadata commits first on add and last on remove,
so a crash can only leave rows whose vectors are (partly) missing, which opening for writing rolls back;
vectors without a row are never deleted: opening refuses instead. (Replicas: ``index.shared_gallery``.)"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from index.checks import check_gallery
from index.committer import AddResult, Committer, CommitterError, replay, replay_metadata
from index.gallery_files import (
    CONFIG,
    LOG_DIR,
    METADATA_COPY,
    STORE_DIR,
    DamagedGalleryError,
    GalleryError,
    VerifyReport,
    busy,
    check_writable,
    parse_config,
)
from index.generations import GenerationError, Generations, Manifest
from index.metadata import DB_NAME, ItemRecord, Metadata, MetadataError, NewItem
from index.served import ConfigView, LabelFilter, SearchFilter
from index.store import SearchResult, VectorStore, as_ids, open_store, store_class
from index.tasks import TaskCheck, add_task, check_model, recorded_fingerprints, remove_task
from index.wal import LogCorruptError, LogScan, WriteAheadLog
from model.data.base import LabelValue
from model.durable import FileLock, LockHeld, atomic_write_bytes
from model.run import LoadedRun
from model.tasks import Fingerprints

_T = TypeVar("_T")
log = logging.getLogger(__name__)


@dataclass
class GalleryInfo:
    root: Path
    backend: str
    options: dict[str, Any]
    tasks: list[str]
    counts: dict[str, int]
    items: int
    model_hash: str
    embedding_dim: int
    generation: int | None
    sizes: dict[str, int]  # bytes: store, metadata, blobs, log
    rejected_generations: list[str]
    log_records: int = 0  # records after the newest snapshot
    fingerprints: bool = False  # per-task fingerprints recorded (a child run can serve it)


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _read_config(root: Path) -> tuple[dict[str, Any], bytes]:
    try:
        data = (root / CONFIG).read_bytes()
    except FileNotFoundError:
        raise GalleryError(f"{root} holds no gallery ({CONFIG} not found)") from None
    return parse_config(root, data), data


def logs_writes(backend: str) -> bool:
    """Whether galleries on ``backend`` write through the log (stores that can snapshot in memory)."""
    return hasattr(store_class(backend), "capture")


class Gallery(ConfigView):
    def __init__(
        self,
        root: Path,
        config: dict[str, Any],
        store: VectorStore,
        metadata: Metadata,
        lock_file: FileLock | None,
    ) -> None:
        self.root = root
        self.config = config
        self.store = store
        self.metadata = metadata
        self.read_only = lock_file is None
        self._lock_file = lock_file
        self._write_lock = threading.Lock()
        self.repairs: list[str] = []  # what opening did or noticed (a dropped torn tail, rolled-back rows)
        self.committer: Committer | None = None
        self.wal: WriteAheadLog | None = None
        self.scan: LogScan | None = None
        self._config_bytes = b""
        self.task_check: TaskCheck | None = None  # how the run it was opened with relates to its tasks
        self._policy = (10_000, 300.0)  # snapshot_every_records, snapshot_every_s
        self._unusable: str | None = None  # why writes are refused after a failed task change

    # --- opening -------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        *,
        tasks: Sequence[str],
        dim: int,
        model_hash: str,
        backend: str = "faiss",
        store_options: dict[str, Any] | None = None,
        fingerprints: Fingerprints | None = None,
        **policy: Any,
    ) -> Gallery:
        """Create an empty gallery in ``root`` (which must not hold one yet) and open it for writing.
        gallery.json is written last: a crash before it leaves no gallery, only files to overwrite.
        ``fingerprints`` (the run's) are recorded for ``tasks`` so that a child run can serve it."""
        if (root / CONFIG).exists():
            raise GalleryError(f"{root} already holds a gallery; open it or choose another directory")
        logged = logs_writes(backend)  # an unknown name fails here, before gallery.json records it
        root.mkdir(parents=True, exist_ok=True)
        for path in root.glob(f"{DB_NAME}*"):
            path.unlink()
        Metadata(root, create=True, logged=logged).close()
        config = {
            "format_version": 2 if logged else 1,
            "backend": backend,
            "store_options": dict(store_options or {}),
            "tasks": list(tasks),
            "embedding_dim": dim,
            "model_hash": model_hash,
        }
        if fingerprints is not None:
            config["fingerprints"] = {
                "shared": fingerprints.shared,
                "tasks": {task: fingerprints.tasks[task] for task in tasks},
            }
        atomic_write_bytes(root / CONFIG, json.dumps(config, indent=2).encode())
        return cls.open(root, model_hash=model_hash, fingerprints=fingerprints, **policy)

    @classmethod
    def open(
        cls,
        root: Path,
        *,
        model_hash: str | None = None,
        fingerprints: Fingerprints | None = None,
        read_only: bool = False,
        snapshot_every_records: int = 10_000,
        snapshot_every_s: float = 300.0,
        store_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Gallery:
        """Open the gallery in ``root`` for a run (``model_hash``, ``fingerprints``: the run's; see the
        module docstring for what is accepted; ``task_check`` says which tasks the run can search).
        The two ``snapshot_every`` settings say when a writer snapshots in the background.
        ``store_overrides[backend]`` replace gallery.json's store options of the same name when the
        gallery has that backend, for this open only (never written back): where a deployment serves
        the gallery from, such as a Milvus server's ``uri`` (``MODRET_MILVUS_URI``); the store still
        refuses generations that do not match it."""
        config, config_bytes = _read_config(root)
        task_check = check_model(root, config, model_hash, fingerprints)
        lock_file = None
        if not read_only:
            check_writable(root)
            try:
                lock_file = FileLock(root / "writer.lock", blocking=False).acquire()
            except LockHeld:
                raise GalleryError(f"{root} is open for writing in another process") from None
        logged = logs_writes(config["backend"])
        generations = Generations(root / STORE_DIR)
        metadata: Metadata | None = None
        store: VectorStore | None = None
        gallery: Gallery | None = None
        try:
            # A reader holds the shared lock so that no snapshot deletes the log it is about to read.
            with generations.locked(shared=True) if read_only and logged else contextlib.nullcontext():
                try:
                    metadata = Metadata(root, read_only=read_only, logged=logged)
                except MetadataError as e:
                    raise DamagedGalleryError(root, "metadata", str(e)) from None
                store = open_store(
                    config["backend"],
                    root / STORE_DIR,
                    tasks=config["tasks"],
                    dim=config["embedding_dim"],
                    model_hash=config["model_hash"],
                    options={**config["store_options"], **(store_overrides or {}).get(config["backend"], {})},
                )
                gallery = cls(root, config, store, metadata, lock_file)
                gallery._config_bytes = config_bytes
                gallery.task_check = task_check
                gallery._policy = (snapshot_every_records, snapshot_every_s)
                if logged:
                    gallery._recover_from_log()
                elif not read_only:
                    gallery._repair_unlogged()
        except BaseException as e:  # whatever failed, the writer lock and the database are let go
            if gallery is not None and gallery.wal is not None:
                gallery.wal.close()
            if store is not None:
                store.close()
            if metadata is not None:
                metadata.close()
            if lock_file is not None:
                lock_file.release()
            if isinstance(e, LogCorruptError):
                raise DamagedGalleryError(root, "log", str(e)) from None
            if isinstance(e, GenerationError):
                raise GalleryError(f"{root}: {e}") from None
            raise
        return gallery

    @staticmethod
    def preflight(root: Path) -> None:
        """The checks of ``open`` that need no loading (config, metadata database, log records), raising
        the same one-line errors, so that a service can refuse a damaged gallery before it starts."""
        config, _ = _read_config(root)
        try:
            Metadata(root, read_only=True, logged=logs_writes(config["backend"])).close()
        except MetadataError as e:
            raise DamagedGalleryError(root, "metadata", str(e)) from None
        if logs_writes(config["backend"]):
            try:
                WriteAheadLog(root / LOG_DIR).scan(after=2**63 - 1)  # checks every record, keeps none
            except LogCorruptError as e:
                raise DamagedGalleryError(root, "log", str(e)) from None

    def _recover_from_log(self) -> None:
        """Newest verified generation + the log records after it; see the module docstring."""
        manifest = self.store.manifest
        snapshot_at = manifest.log_position if manifest else 0
        if manifest is not None and CONFIG in manifest.files:
            copy = self.store.generations.directory(manifest) / CONFIG
            if parse_config(self.root, copy.read_bytes()) != self.config:
                raise DamagedGalleryError(
                    self.root, "config", f"{CONFIG} differs from its copy in generation {manifest.generation}"
                )
        applied = self.metadata.applied_position()
        legacy = applied is None  # metadata written before the log existed
        self.wal = WriteAheadLog(self.root / LOG_DIR)
        scan = self.scan = self.wal.scan(after=min(snapshot_at, applied or 0))
        if legacy and scan.segments:
            raise DamagedGalleryError(
                self.root, "metadata", f"{DB_NAME} has no log position but a log exists"
            )
        applied = applied or 0
        end = max(scan.last, snapshot_at)
        if scan.segments and scan.first > snapshot_at + 1:
            gen = (
                f"generation {manifest.generation} covers only" if manifest else "no snapshot (store/) covers"
            )
            missing = f"records {snapshot_at + 1}..{scan.first - 1} are missing"
            message = f"the log starts at record {scan.first} but {gen} up to {snapshot_at}: {missing}"
            raise DamagedGalleryError(self.root, "log", message)
        if applied > end:
            raise DamagedGalleryError(
                self.root, "log", f"{DB_NAME} has applied record {applied} but the log ends at {end}"
            )
        if scan.segments and applied < scan.first - 1:
            raise DamagedGalleryError(
                self.root,
                "metadata",
                f"{DB_NAME} is at record {applied}, older than the log (which starts at {scan.first})",
            )
        if scan.tail is not None:
            self.repairs.append(scan.tail.describe())
        # A reader stops where the metadata it reads stops; records after it are being applied now.
        upto = end if not self.read_only else applied
        replayed = replay(
            [r for r in scan.records if r.position <= upto], self.store, self.tasks, after=snapshot_at
        )
        if not self.read_only:
            replay_metadata(scan.records, self.metadata, after=applied)
            if legacy:
                self._repair_unlogged()
                self.metadata.start_log()
        self._check_agreement()
        if replayed:
            log.info(
                "%s: replayed %d log records after generation position %d", self.root, replayed, snapshot_at
            )
        if self.read_only:
            return
        self.wal.open_for_append(scan, end + 1)
        self._start_committer(end, -1 if legacy else snapshot_at)  # a legacy gallery snapshots on close

    def _start_committer(self, position: int, snapshot_position: int) -> None:
        assert self.wal is not None
        self.committer = Committer(
            wal=self.wal,
            metadata=self.metadata,
            store=self.store,
            tasks=self.tasks,
            capture=self.store.capture,  # type: ignore[attr-defined]  # logs_writes checked it exists
            write_snapshot=self._write_snapshot,
            position=position,
            snapshot_position=snapshot_position,
            every_records=self._policy[0],
            every_s=self._policy[1],
        )

    def _check_agreement(self) -> None:
        """Metadata and vectors after replay must hold the same ids; refuse (never delete) otherwise."""
        if self.read_only:
            return  # verify reports disagreements in detail
        known = self.metadata.ids()
        stored = self.store.ids(self.tasks[0])
        counts = {task: self.store.count(task) for task in self.tasks}
        if np.array_equal(known, stored) and set(counts.values()) == {len(known)}:
            return
        without = np.setdiff1d(stored, known)
        missing = np.setdiff1d(known, stored)
        raise DamagedGalleryError(
            self.root,
            "metadata",
            f"metadata and vectors disagree after replaying the log ({len(missing)} items without vectors, "
            f"e.g. {missing[:5].tolist()}; {len(without)} vectors without metadata, e.g. "
            f"{without[:5].tolist()}; counts per task {counts}); nothing was changed",
        )

    def _repair_unlogged(self) -> None:
        """Roll back rows whose vectors are missing (a crashed add, or a remove the store finished);
        refuse, deleting nothing, when vectors have no row (the metadata lost them)."""
        per_task = [self.store.ids(task) for task in self.tasks]
        everywhere = per_task[0]
        for ids in per_task[1:]:
            everywhere = np.intersect1d(everywhere, ids)
        anywhere = np.unique(np.concatenate(per_task))
        known = self.metadata.ids()
        orphaned = np.setdiff1d(anywhere, known)
        if len(orphaned):
            raise DamagedGalleryError(
                self.root,
                "metadata",
                f"{len(orphaned)} stored vectors have no metadata row (e.g. {orphaned[:5].tolist()}): "
                f"{DB_NAME} lost them; nothing was deleted",
            )
        unsaved = np.setdiff1d(known, everywhere)
        partial = np.intersect1d(unsaved, anywhere)
        if len(partial):
            self.store.remove(partial)
        if len(unsaved):
            self.metadata.remove(unsaved)
            what = f"{len(unsaved)} items whose vectors were never (fully) stored were rolled back"
            self.repairs.append(what)
            log.warning("%s: %s", self.root, what)

    # --- writing -------------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise GalleryError(f"{self.root} is open read-only")
        if self._unusable is not None:
            raise GalleryError(self._unusable)

    def insert(self, items: Sequence[NewItem], vectors: np.ndarray) -> AddResult:
        """Add ``items`` with their embeddings ``vectors`` (N, T, D) in task order: durable and visible
        on return. Content already in the gallery (same sha256) keeps its id and is not stored again."""
        self._check_writable()
        expected = (len(items), len(self.tasks), self.embedding_dim)
        if vectors.shape != expected:
            raise ValueError(f"vectors have shape {vectors.shape}, expected {expected}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.wal is not None:
            self.metadata.store_blobs(items)  # durable before the record that refers to them
            return self._log_write(lambda committer: committer.add(items, vectors))
        with self._write_lock:
            ids, new = self.metadata.add(items)
            rows = [i for i, is_new in enumerate(new) if is_new]
            new_ids = np.array([ids[i] for i in rows], dtype=np.int64)
            if len(new_ids):
                try:
                    self.store.add(new_ids, {t: vectors[rows, j] for j, t in enumerate(self.tasks)})
                except BaseException:
                    self.metadata.remove(new_ids)
                    raise
        return AddResult(ids, new)

    def _log_write(self, call: Callable[[Committer], _T]) -> _T:
        """``call`` on the log's committer. A task change holds the write lock with no committer: a write
        waits it out and runs on the committer it starts (an add then meets the new task list: ValueError,
        the caller picks its columns again), also when the change closed the committer under it."""
        for attempt in range(2):
            committer = self.committer
            if committer is None:
                with self._write_lock:
                    committer = self.committer or busy(self.root)
            try:
                return call(committer)
            except CommitterError as e:
                if attempt or self.committer is committer:
                    raise GalleryError(str(e)) from e
        raise AssertionError("unreachable")

    def add(self, items: Sequence[NewItem], vectors: np.ndarray) -> list[int]:
        return self.insert(items, vectors).ids  # the ids of ``items`` (see ``insert``)

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove ``ids``; durable on return. Returns how many were in the gallery."""
        self._check_writable()
        if self.wal is not None:
            return self._log_write(lambda committer: committer.remove(np.asarray(ids, dtype=np.int64)))
        with self._write_lock:  # vectors first: a crash between leaves a row to roll back, never orphans
            self.store.remove(np.asarray(ids, dtype=np.int64))
            return self.metadata.remove(ids)

    def save(self) -> Manifest | None:
        """Snapshot now (``modret index compact``) and wait for it; the log is truncated behind it."""
        self._check_writable()
        if self.committer is None:
            return self.store.save()
        try:
            return self.committer.snapshot() or self.store.manifest
        except CommitterError as e:
            raise GalleryError(str(e)) from e

    # --- changing the task list (driven by index.tasks; see the module docstring) ----------------------

    def add_task(self, task: str, run: LoadedRun, **options: Any) -> int:
        """``index.tasks.add_task``: index every item under the run's ``task`` (``images``, ``progress``)."""
        return add_task(self, task, run, **options)

    def remove_task(self, task: str) -> None:
        """Drop ``task``'s index durably (``index.tasks.remove_task``)."""
        remove_task(self, task)

    def change_tasks(
        self, config: dict[str, Any], change: Callable[[], None], undo: Callable[[], None]
    ) -> None:
        """With writes paused: ``change`` the store (one task's index added or dropped), snapshot it with
        ``config``, replace gallery.json, snapshot again. If the first snapshot fails, ``undo`` reverts
        the store (raising: the gallery then takes no more writes; reopen it, its files are unchanged)."""
        self._check_writable()
        with self._write_lock:
            committer, self.committer = self.committer, None
            if committer is not None:
                committer.close(snapshot=False)  # answers what is queued, lets a running snapshot finish
            position = committer.position if committer is not None else 0
            if self.store.manifest is None:
                self._snapshot_now(position)  # a generation of the old task list to fall back to
            old_bytes = self._config_bytes
            try:
                change()
                names = getattr(self.store, "options", {}).get("collections")  # Milvus: kept by name
                if names is not None:
                    config["store_options"] = {**config["store_options"], "collections": dict(names)}
                self._config_bytes = json.dumps(config, indent=2).encode()
                self._snapshot_now(position)
            except BaseException:
                self._config_bytes = old_bytes
                self._unusable = f"{self.root}: a task change failed; reopen the gallery (it is unchanged)"
                undo()  # when this raises too, the gallery stays unusable
                self._unusable = None
                if committer is not None:
                    self._start_committer(position, committer.snapshot_position)
                raise
            atomic_write_bytes(self.root / CONFIG, self._config_bytes)
            self.config = config
            self._snapshot_now(position)  # the fall-back generation of the new task list
            self.store.discard_removed()
            if committer is not None:
                self._start_committer(position, position)

    def _snapshot_now(self, position: int) -> None:
        if self.wal is None:
            self.store.save()
        else:
            self._write_snapshot(self.store.capture(), position)  # type: ignore[attr-defined]

    def _write_snapshot(self, capture: Any, position: int) -> Manifest:
        """The snapshot thread's work: vectors, metadata and config as one generation, then the log
        segments that every kept generation covers are deleted."""

        def extra(directory: Path) -> None:
            self.metadata.backup(directory / METADATA_COPY)
            (directory / CONFIG).write_bytes(self._config_bytes)

        manifest: Manifest = self.store.commit(  # type: ignore[attr-defined]
            capture, extra=extra, log_position=position
        )
        assert self.wal is not None
        generations = self.store.generations
        with generations.locked(shared=False):
            self.wal.truncate_through(generations.retained_position())
        return manifest

    # --- reading -------------------------------------------------------------------------------------

    def label_filter(self, conditions: Mapping[str, LabelValue]) -> LabelFilter:
        return LabelFilter(conditions, allowed=self.metadata.matching(conditions))  # one lookup, every task

    def search(self, task: str, queries: np.ndarray, k: int, filter: SearchFilter = None) -> SearchResult:
        """Top ``k`` ids and cosine scores under ``task``; ``filter``: labels equal to ``{"Male": 1}``'s."""
        if not isinstance(filter, LabelFilter):
            filter = self.label_filter(filter) if filter else None
        return self.store.search(task, queries, k, filter.allowed if filter else None)

    def vectors(self, ids: Sequence[int] | np.ndarray, task: str) -> np.ndarray:
        """The stored (n, D) embeddings of ``ids`` under ``task``, row i for ``ids[i]`` (no re-embedding).

        Raises ``UnknownTaskError`` for a task the gallery was not built for and ``UnknownIdError``
        (naming them) for ids without vectors. Exact copies except for approximate stores that keep
        compressed codes (faiss IVF-PQ), which return their decoded vectors."""
        return self.store.get(task, as_ids(ids))

    def items(self, ids: Sequence[int] | np.ndarray) -> dict[int, ItemRecord]:
        return self.metadata.get(ids)

    def image_bytes(self, item: ItemRecord) -> bytes | None:  # ``GET /images/{id}/content`` (index.served)
        return self.metadata.read_blob(item.content_hash) if item.has_blob else None

    def info(self) -> GalleryInfo:
        manifest = self.store.manifest
        at = manifest.log_position if manifest else 0
        position = self.committer.position if self.committer else self.metadata.applied_position() or 0
        return GalleryInfo(
            root=self.root,
            backend=self.config["backend"],
            options=dict(manifest.options if manifest else self.config["store_options"]),
            tasks=self.tasks,
            counts={task: self.store.count(task) for task in self.tasks},
            items=self.metadata.count(),
            model_hash=self.model_hash,
            embedding_dim=self.embedding_dim,
            generation=manifest.generation if manifest else None,
            sizes={
                "store": _tree_size(self.root / STORE_DIR),
                "metadata": sum(_tree_size(p) for p in self.root.glob(f"{DB_NAME}*")),
                "blobs": _tree_size(self.metadata.blob_dir),
                "log": _tree_size(self.root / LOG_DIR),
            },
            rejected_generations=list(self.store.generations.rejected),
            log_records=max(0, position - at) if self.wal is not None else 0,
            fingerprints=recorded_fingerprints(self.config) is not None,
        )

    def verify(self, model_hash: str | None = None, fingerprints: Fingerprints | None = None) -> VerifyReport:
        """Checksums of every kept generation (and its metadata and config copies), the log, the model
        match (per task with fingerprints), every metadata id in every task, the blobs (``index.checks``)."""
        return check_gallery(self, model_hash, fingerprints)

    def close(self, *, snapshot: bool = True) -> None:
        """Stop writing (answering queued writes first); with ``snapshot``, snapshot what the log holds."""
        try:
            if self.committer is not None:
                self.committer.close(snapshot=snapshot)
        finally:
            if self.wal is not None:
                self.wal.close()
            self.store.close()
            self.metadata.close()
            if self._lock_file is not None:
                self._lock_file.release()
