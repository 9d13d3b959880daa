"""Gallery writes from the service: one writer at a time, duplicates reported, saves group-committed.

An upload is acknowledged only after a ``Gallery.save()`` that followed it returned (the gallery's rule
for durable adds). Concurrent uploads share saves: a save started after a write covers it, so under load
many uploads ride on one save instead of queueing one save each. Removals are durable when ``remove``
returns (the metadata row is gone; the store is corrected on the next open), so they only mark the
gallery dirty for the save at shutdown. Blocking: call from a worker thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from index.gallery import Gallery
from index.metadata import NewItem

log = logging.getLogger("service.gallery")


@dataclass(frozen=True)
class Added:
    id: int
    duplicate: bool


class GalleryWriter:
    def __init__(self, gallery: Gallery, save_after_write: bool = True) -> None:
        self.gallery = gallery
        self.save_after_write = save_after_write
        self._write_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._written = 0  # writes applied (version counter)
        self._saved = 0  # writes covered by the last completed save

    @property
    def dirty(self) -> bool:
        return self._saved < self._written

    def add(self, items: Sequence[NewItem], vectors: np.ndarray) -> list[Added]:
        with self._write_lock:
            before = self.gallery.metadata.ids()
            ids = self.gallery.add(items, vectors)
            self._written += 1
            version = self._written
        existed = np.isin(np.asarray(ids, dtype=np.int64), before)
        seen: set[int] = set()
        out = []
        for item_id, was_there in zip(ids, existed, strict=True):
            out.append(Added(int(item_id), bool(was_there) or item_id in seen))
            seen.add(int(item_id))
        if self.save_after_write and any(not a.duplicate for a in out):
            self.save_through(version)
        return out

    def remove(self, item_id: int) -> bool:
        with self._write_lock:
            removed = self.gallery.remove([item_id]) > 0
            if removed:
                self._written += 1
        return removed

    def save_through(self, version: int | None = None) -> None:
        """Save unless a save that began after write ``version`` already finished."""
        with self._save_lock:
            target = self._written
            if version is not None and self._saved >= version:
                return
            if version is None and self._saved >= target:
                return
            self.gallery.save()
            self._saved = target

    def generation(self) -> int | None:
        manifest = self.gallery.store.manifest
        return manifest.generation if manifest is not None else None
