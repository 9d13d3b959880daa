"""Gallery writes from the service: each one durable before it is answered, duplicates reported.

The gallery writes through its write-ahead log (``index.committer``): an add or remove returns once its
log record is fsynced and applied, and concurrent requests share one fsync (group commit); a duplicate
upload is answered with the existing id only once the record that created that id is durable. Snapshots
happen in the gallery's background thread, never in a request: a request waits at most for the log's
fsync (and, once per snapshot, for the in-memory copy of the indexes). Milvus galleries are durable
through Milvus' own log when ``add``/``remove`` return; a shared gallery (replicas) once PostgreSQL has
committed the rows and Milvus acknowledged the vectors (``index.shared_gallery``). Blocking: call from a
worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from index.gallery_files import GalleryError, StorageFull
from index.metadata import NewItem
from index.served import ServedGallery
from service.runtime.errors import GalleryOutOfDate, InsufficientStorage, Unavailable

log = logging.getLogger("service.gallery")


@dataclass(frozen=True)
class Added:
    id: int
    duplicate: bool


class GalleryWriter:
    def __init__(self, gallery: ServedGallery) -> None:
        self.gallery = gallery

    def add(self, items: Sequence[NewItem], vectors: np.ndarray, tasks: Sequence[str]) -> list[Added]:
        """Store ``items`` with ``vectors`` (N, len(tasks), D), their embeddings under the run's ``tasks``:
        one log record (one fsync) for the whole call, however many items it holds. The gallery takes its
        own tasks' columns as they are when it stores them (a task indexed meanwhile included)."""
        for attempt in range(2):
            columns = list(self.gallery.tasks)
            try:
                result = self.gallery.insert(items, gallery_columns(vectors, tasks, columns))
            except GalleryError as exc:
                raise _not_writable(exc) from exc
            except ValueError:
                if attempt or list(self.gallery.tasks) == columns:
                    raise
                continue  # the gallery's task list changed in between: its new columns, once more
            return [Added(int(i), not new) for i, new in zip(result.ids, result.new, strict=True)]
        raise AssertionError("unreachable")

    def remove(self, item_id: int) -> bool:
        try:
            return self.gallery.remove([item_id]) > 0
        except GalleryError as exc:
            raise _not_writable(exc) from exc

    def generation(self) -> int | None:
        manifest = self.gallery.store.manifest
        return manifest.generation if manifest is not None else None


def gallery_columns(vectors: np.ndarray, tasks: Sequence[str], gallery_tasks: Sequence[str]) -> np.ndarray:
    """The run's (N, len(tasks), D) embeddings as the gallery stores them: its tasks, in its order;
    ``GalleryOutOfDate`` when it indexes a task the run lacks (nothing can embed new items under it)."""
    dropped = [task for task in gallery_tasks if task not in tasks]
    if dropped:
        raise GalleryOutOfDate(dropped)
    return vectors[:, [list(tasks).index(task) for task in gallery_tasks]]


def _not_writable(exc: GalleryError) -> InsufficientStorage | Unavailable:
    """No room on the disk for this write (507: free space and retry, nothing else to do), or the gallery
    stopped taking writes (its log could not be written: 503; searches go on, a restart replays the
    log). Never an internal error."""
    log.error("gallery write refused", extra={"fields": {"reason": str(exc)}})
    if isinstance(exc, StorageFull):
        return InsufficientStorage(str(exc))
    return Unavailable(
        f"the gallery is not taking writes: {exc}", code="gallery_unavailable", retry_after_s=30
    )
