"""Group commit and background snapshots for a gallery with a write-ahead log (``index.wal``).

One thread, the committer, decides, logs, fsyncs and applies every write of the gallery, in order:

1. It takes every write queued so far (a batch: the writes that arrived while the previous fsync ran).
2. It plans them one after another: new ids for new contents, the existing id for content already in
   the gallery (or earlier in the batch), which ids a remove really removes.
3. It appends one record per write that changes something and fsyncs once for the batch (group commit:
   concurrent writers share the fsync).
4. It applies the records in log order, each record's metadata (one SQLite transaction) before its
   vectors: a search finds an added item only once its metadata exists, and one that finds a removed
   item's vector in between skips it for its missing metadata.
5. Only then is every write of the batch answered. So an answer that names an id (a duplicate's too)
   comes after the record that created that id is durable, and whatever a reader sees is durable.

A snapshot (a generation: vectors, metadata and config under one manifest) is captured by the committer
between two batches (in-memory copies of the indexes, under the store's read lock: searches go on; the
log starts a new segment) after ``every_records`` records or ``every_s`` seconds with new records, and
written by a second thread while writes continue; a snapshot asked for by ``snapshot()`` (``modret index
compact``, ``Gallery.save``) or at ``close`` is waited for. The writer of a snapshot then deletes the log
segments every kept generation covers.

No room on the disk (ENOSPC, a spent quota, SQLite's "database or disk is full") refuses writes, it does
not stop the gallery: an append that fails is cut back by the log, a record whose metadata could not be
written is cut from the log (its transaction rolled back, its vectors not yet applied), and the writes from
the first refused one on raise ``StorageFull``; the next batch is taken as usual, so freeing space is all
it takes. Any other failure to write the log or apply a logged record stops the committer (every later
write raises ``GalleryError`` asking for a restart, which replays the log): it never answers a write whose
state it does not know.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from index.gallery_files import StorageFull
from index.generations import Manifest
from index.metadata import Metadata, NewItem
from index.store import VectorStore
from index.wal import ADD, REMOVE, ItemRecord, Record, WriteAheadLog, encode_add, encode_remove
from model.data.base import as_label_value
from model.durable import storage_full

log = logging.getLogger(__name__)


class CommitterError(RuntimeError):
    """The committer stopped taking writes; the message says why and what to do."""


@dataclass(frozen=True)
class AddResult:
    ids: list[int]
    new: list[bool]  # False: the content was already in the gallery (or earlier in the same call)


@dataclass
class _Write:
    kind: str  # "add", "remove" or "snapshot"
    items: Sequence[NewItem] = ()
    vectors: np.ndarray | None = None  # (N, T, D)
    ids: np.ndarray | None = None
    future: Future[Any] = field(default_factory=Future)


def replay(records: Sequence[Record], store: VectorStore, tasks: Sequence[str], *, after: int) -> int:
    """Apply the records with position > ``after`` to ``store`` (a run of adds in one call); how many."""
    pending_ids: list[np.ndarray] = []
    pending_vectors: list[np.ndarray] = []

    def flush() -> None:
        if pending_ids:
            vectors = np.concatenate(pending_vectors)
            store.add(np.concatenate(pending_ids), {t: vectors[:, j] for j, t in enumerate(tasks)})
            pending_ids.clear()
            pending_vectors.clear()

    count = 0
    for record in records:
        if record.position <= after:
            continue
        count += 1
        if record.kind == ADD and record.items:
            assert record.vectors is not None
            pending_ids.append(np.array([item.id for item in record.items], dtype=np.int64))
            pending_vectors.append(record.vectors)
        elif record.kind == REMOVE:
            flush()
            store.remove(np.array(record.ids, dtype=np.int64))
    flush()
    return count


def replay_metadata(records: Sequence[Record], metadata: Metadata, *, after: int) -> int:
    count = 0
    for record in records:
        if record.position <= after:
            continue
        count += 1
        if record.kind == ADD:
            metadata.apply_add(record.items, record.ids, record.position)
        else:
            metadata.apply_remove(record.ids, record.position)
    return count


class Committer:
    def __init__(
        self,
        *,
        wal: WriteAheadLog,
        metadata: Metadata,
        store: VectorStore,
        tasks: Sequence[str],
        capture: Callable[[], Any],
        write_snapshot: Callable[[Any, int], Manifest],
        position: int,
        snapshot_position: int,
        every_records: int,
        every_s: float,
    ) -> None:
        self.wal = wal
        self.metadata = metadata
        self.store = store
        self.tasks = list(tasks)
        self._capture = capture
        self._write_snapshot = write_snapshot
        self.position = position  # last record applied to metadata and store
        self.snapshot_position = snapshot_position  # last record covered by a committed snapshot
        self.every_records = every_records
        self.every_s = every_s
        self._last_snapshot = time.monotonic()
        self._next_id = metadata.next_id()
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._snapshots = ThreadPoolExecutor(1, thread_name_prefix="gallery-snapshot")
        self._job: Future[Manifest] | None = None
        self._failed: str | None = None
        self._closed = False
        self.batches = 0  # batches committed (fsyncs), for tests and metrics
        self._thread = threading.Thread(target=self._run, name="gallery-commit", daemon=True)
        self._thread.start()

    # --- what writers call ---------------------------------------------------------------------------

    def _submit(self, write: _Write) -> Any:
        if self._failed is not None:
            raise CommitterError(self._failed)
        if self._closed:
            raise CommitterError("the gallery is closing: it takes no more writes")
        self._queue.put(write)
        return write.future.result()

    def add(self, items: Sequence[NewItem], vectors: np.ndarray) -> AddResult:
        """Durable and visible when this returns; ``vectors`` is (len(items), T, D), T in this log's order."""
        if vectors.ndim != 3 or vectors.shape[1] != len(self.tasks):
            raise ValueError(f"vectors have shape {vectors.shape}, expected (n, {len(self.tasks)}, D)")
        result: AddResult = self._submit(_Write("add", items=items, vectors=vectors))
        return result

    def remove(self, ids: np.ndarray) -> int:
        removed: int = self._submit(_Write("remove", ids=np.unique(np.asarray(ids, dtype=np.int64))))
        return removed

    def snapshot(self) -> Manifest | None:
        """Take a snapshot now (after any running one) and wait for it; None when nothing changed."""
        manifest: Manifest | None = self._submit(_Write("snapshot"))
        return manifest

    def close(self, *, snapshot: bool) -> None:
        """Answer what is queued, then (with ``snapshot``) take a final snapshot; stop both threads."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        try:
            if snapshot and self._failed is None and self.position > self.snapshot_position:
                self._wait_for_job()
                self._start_snapshot().result()
        finally:
            self._wait_for_job()
            self._snapshots.shutdown(wait=True)

    # --- the committer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=self._timeout())
            except queue.Empty:
                self._maybe_snapshot()
                continue
            batch: list[_Write] = []
            item: _Write | None = first
            while True:
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._commit([w for w in batch if w.kind != "snapshot"])
            for write in batch:
                if write.kind == "snapshot":
                    self._answer_snapshot(write)
            if not stopping:
                self._maybe_snapshot()

    def _timeout(self) -> float | None:
        if self.position <= self.snapshot_position:
            return None  # nothing to snapshot: sleep until a write comes
        if self._due():  # a snapshot is due but one is still being written: look again soon
            return 0.05
        return max(0.05, self.every_s - (time.monotonic() - self._last_snapshot))

    def _commit(self, batch: list[_Write]) -> None:
        if not batch:
            return
        if self._failed is not None:
            for write in batch:
                write.future.set_exception(CommitterError(self._failed))
            return
        try:
            records, results, owners = self._plan(batch)
            if records:
                self.wal.append([(kind, payload) for kind, payload, _ in records])
                self.batches += 1
        except OSError as e:  # the log cut its append back (else LogStateUnknown, below)
            if storage_full(e):
                self._refuse(batch, 0, e)
            else:
                self._fail(f"the write-ahead log could not be written ({e!r})", batch)
            return
        except BaseException as e:  # the log is in an unknown state: stop rather than guess
            self._fail(f"the write-ahead log could not be written ({e!r})", batch)
            return
        for r, (kind, _, record) in enumerate(records):
            position = self.position + 1
            try:  # metadata first: one SQLite transaction, rolled back whole if it fails
                if kind == ADD:
                    self.metadata.apply_add(record.items, record.ids, position)
                else:
                    self.metadata.apply_remove(record.ids, position)
            except BaseException as e:
                if not storage_full(e):
                    self._fail(f"a logged write could not be applied ({e!r})", batch)
                    return
                try:  # nothing of record r is applied: drop it and the batch's later ones from the log
                    self.wal.rewind(self.position)
                except BaseException as cut:
                    self._fail(f"a logged write could not be applied ({e!r}) nor unlogged ({cut!r})", batch)
                    return
                self._refuse(batch, owners[r], e, results)
                return
            try:  # then the vectors: a search finds an added item once its metadata exists, and a
                # removed item found meanwhile is skipped for its missing metadata (service.runtime.ranking)
                if kind == ADD:
                    if record.items:
                        assert record.vectors is not None
                        ids = np.array([item.id for item in record.items], dtype=np.int64)
                        vectors = record.vectors
                        self.store.add(ids, {t: vectors[:, j] for j, t in enumerate(self.tasks)})
                else:
                    self.store.remove(np.array(record.ids, dtype=np.int64))
            except BaseException as e:
                self._fail(f"a logged write could not be applied ({e!r})", batch)
                return
            self.position = position
        for write, result in zip(batch, results, strict=True):
            write.future.set_result(result)

    def _refuse(
        self, batch: list[_Write], first: int, exc: BaseException, results: Sequence[Any] = ()
    ) -> None:
        """No room on the disk: the writes from ``batch[first]`` on are not applied (nor logged) and get
        ``StorageFull``; those before it were applied and get their ``results``. The next batch is taken
        as usual, so freeing space is all it takes for writes to succeed again."""
        error = StorageFull(self.wal.directory.parent, exc)
        log.error("%s", error)
        with contextlib.suppress(Exception):  # the refused adds' ids are free again (else merely skipped)
            self._next_id = self.metadata.next_id()
        for i, write in enumerate(batch):
            if i < first:
                write.future.set_result(results[i])
            else:
                write.future.set_exception(error)

    def _fail(self, reason: str, batch: list[_Write]) -> None:
        self._failed = f"{reason}; the gallery takes no more writes: restart the service (it replays the log)"
        log.error("%s", self._failed)
        for write in batch:
            if not write.future.done():
                write.future.set_exception(CommitterError(self._failed))

    def _plan(self, batch: list[_Write]) -> tuple[list[tuple[int, bytes, Record]], list[Any], list[int]]:
        """The records the batch needs (kind, payload, decoded form), each write's answer, and for each
        record the index of the write it belongs to (a write has at most one)."""
        records: list[tuple[int, bytes, Record]] = []
        results: list[Any] = []
        owners: list[int] = []
        taken: dict[str, int] = {}  # content hash -> id, new in this batch
        added: set[int] = set()
        removed: set[int] = set()
        added_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        for w, write in enumerate(batch):
            if write.kind == "add":
                assert write.vectors is not None
                known = self.metadata.ids_by_hash([item.content_hash for item in write.items])
                ids: list[int] = []
                new: list[bool] = []
                rows: list[int] = []
                logged: list[ItemRecord] = []
                blob_ids: list[int] = []
                for row, item in enumerate(write.items):
                    digest = item.content_hash
                    hit = known.get(digest)
                    if digest in taken:
                        ids.append(taken[digest])
                        new.append(False)
                        continue
                    if hit is not None and hit[0] not in removed:
                        ids.append(hit[0])
                        new.append(False)
                        if item.data is not None and not hit[1] and hit[0] not in blob_ids:
                            blob_ids.append(hit[0])
                        continue
                    item_id = self._next_id
                    self._next_id += 1
                    taken[digest] = item_id
                    added.add(item_id)
                    ids.append(item_id)
                    new.append(True)
                    rows.append(row)
                    logged.append(
                        ItemRecord(
                            item_id, item.source, digest, item.width, item.height,
                            {k: as_label_value(v) for k, v in item.labels.items()},
                            item.data is not None, added_at,
                        )
                    )  # fmt: skip
                if logged or blob_ids:
                    vectors = np.ascontiguousarray(write.vectors[rows], dtype=np.float32)
                    record = Record(0, ADD, items=logged, vectors=vectors, ids=blob_ids)
                    records.append((ADD, encode_add(logged, vectors, blob_ids), record))
                    owners.append(w)
                results.append(AddResult(ids, new))
            else:
                assert write.ids is not None
                wanted = [int(i) for i in write.ids]
                stored = set(self.metadata.get(wanted)) | (added & set(wanted))
                present = sorted(stored - removed)
                removed.update(present)
                if present:
                    records.append((REMOVE, encode_remove(present), Record(0, REMOVE, ids=present)))
                    owners.append(w)
                results.append(len(present))
        return records, results, owners

    # --- snapshots -----------------------------------------------------------------------------------

    def _due(self) -> bool:
        behind = self.position - self.snapshot_position
        if behind <= 0:
            return False
        return behind >= self.every_records or time.monotonic() - self._last_snapshot >= self.every_s

    def _maybe_snapshot(self) -> None:
        if self._failed is None and self._due() and (self._job is None or self._job.done()):
            self._start_snapshot()

    def _start_snapshot(self) -> Future[Manifest]:
        """Capture now (committer thread, between batches) and write it in the snapshot thread."""
        capture = self._capture()
        position = self.position
        self.wal.rotate()  # records after the snapshot start a segment of their own
        self._last_snapshot = time.monotonic()
        job = self._snapshots.submit(self._write, capture, position)
        self._job = job
        return job

    def _write(self, capture: Any, position: int) -> Manifest:
        try:
            manifest = self._write_snapshot(capture, position)
        except BaseException as e:
            if storage_full(e):  # expected while the disk is full: one line, the next snapshot tries again
                log.error("snapshot at log position %d failed for want of disk space (%s); the log keeps "
                          "every record", position, e)  # fmt: skip
            else:
                log.exception("snapshot at log position %d failed; the log keeps every record", position)
            raise
        self.snapshot_position = max(self.snapshot_position, position)
        return manifest

    def _wait_for_job(self) -> None:
        job = self._job
        if job is not None:
            with contextlib.suppress(Exception):  # logged by _write; the next snapshot tries again
                job.result()

    def _answer_snapshot(self, write: _Write) -> None:
        """An asked-for snapshot: after the running one, then one covering everything applied so far."""
        try:
            self._wait_for_job()
            if self.position <= self.snapshot_position:
                write.future.set_result(None)
                return
            job = self._start_snapshot()
        except BaseException as e:
            write.future.set_exception(e)
            return
        job.add_done_callback(lambda done: _chain(done, write.future))

    def __repr__(self) -> str:
        return f"Committer(position={self.position}, snapshot={self.snapshot_position})"


def _chain(done: Future[Manifest], target: Future[Any]) -> None:
    error = done.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(done.result())
