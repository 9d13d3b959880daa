"""What the service needs from a gallery, whichever kind serves it (#14).

Two galleries keep this contract: ``index.gallery.Gallery`` (one machine: SQLite + faiss or Milvus, a
write-ahead log, a writer lock) and ``index.shared_gallery.SharedGallery`` (replicas: PostgreSQL metadata
and a Milvus server, no local state). ``service.runtime`` types its gallery as ``ServedGallery`` and never
asks which one it has; mypy checks below that both conform.

- ``insert`` is durable and visible on return (an ``AddResult``: ids, and whether each item is new),
  ``remove`` returns how many were there; both raise ``GalleryError`` when the gallery takes no writes.
- ``search(task, queries, k, filter)`` restricts to items whose labels equal ``filter``'s values
  (``UnknownLabelError`` for a name no item has) and returns only ids a reader may see (never one whose
  add is still in flight on another replica); ``label_filter(conditions)`` resolves a filter once for
  every task a search runs (the allowed ids, or the vector store's filter expression), and ``search``
  takes the result in place of the conditions; ``vectors``/``items`` read by id (``items``: visible items
  only); ``image_bytes`` the kept bytes of an item's image, or None.
- ``store`` and ``metadata`` are the stores underneath, for counts and reads by id (``store.get``,
  ``store.count``, ``metadata.ids``/``count``/``label_names``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from index.committer import AddResult
from index.gallery_files import VerifyReport
from index.metadata import ItemRecord, NewItem
from index.metadata_contract import MetadataStore
from index.store import SearchResult, VectorStore
from index.tasks import TaskCheck
from model.data.base import LabelValue
from model.tasks import Fingerprints

if TYPE_CHECKING:
    from index.gallery import Gallery, GalleryInfo
    from index.shared_gallery import SharedGallery


@dataclass(frozen=True)
class LabelFilter:
    """A label filter resolved once (``ServedGallery.label_filter``), for every task a search runs: the
    ids allowed (one machine: one metadata lookup) or an expression the vector store evaluates."""

    conditions: Mapping[str, LabelValue]
    allowed: np.ndarray | None = None
    expression: str = ""


SearchFilter = Mapping[str, LabelValue] | LabelFilter | None  # conditions, or resolved once


class ConfigView:
    """What both galleries read off their config (gallery.json, or the replicas' PostgreSQL row)."""

    config: dict[str, Any]

    @property
    def tasks(self) -> list[str]:
        return list(self.config["tasks"])

    @property
    def model_hash(self) -> str:
        return str(self.config["model_hash"])

    @property
    def embedding_dim(self) -> int:
        return int(self.config["embedding_dim"])


class ServedGallery(Protocol):
    root: Path
    task_check: TaskCheck | None
    repairs: list[str]

    @property
    def config(self) -> dict[str, Any]: ...

    @property
    def store(self) -> VectorStore: ...

    @property
    def metadata(self) -> MetadataStore: ...

    @property
    def tasks(self) -> list[str]: ...

    @property
    def model_hash(self) -> str: ...

    @property
    def embedding_dim(self) -> int: ...

    def insert(self, items: Sequence[NewItem], vectors: np.ndarray) -> AddResult: ...

    def add(self, items: Sequence[NewItem], vectors: np.ndarray) -> list[int]: ...

    def remove(self, ids: Sequence[int] | np.ndarray) -> int: ...

    def label_filter(self, conditions: Mapping[str, LabelValue]) -> LabelFilter: ...

    def search(self, task: str, queries: np.ndarray, k: int, filter: SearchFilter = None) -> SearchResult: ...

    def vectors(self, ids: Sequence[int] | np.ndarray, task: str) -> np.ndarray: ...

    def items(self, ids: Sequence[int] | np.ndarray) -> dict[int, ItemRecord]: ...

    def image_bytes(self, item: ItemRecord) -> bytes | None: ...

    def info(self) -> GalleryInfo: ...

    def verify(
        self, model_hash: str | None = None, fingerprints: Fingerprints | None = None
    ) -> VerifyReport: ...

    def close(self, *, snapshot: bool = True) -> None: ...


if TYPE_CHECKING:  # mypy checks that both galleries keep the contract

    def _conforms(local: Gallery, shared: SharedGallery) -> tuple[ServedGallery, ServedGallery]:
        return local, shared
