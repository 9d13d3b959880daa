"""The metadata contract: what a gallery without a write-ahead log needs from its metadata, and what the
replicas of a cluster need beyond it (#14); and which backend a metadata URL selects.

Two backends implement it: ``index.metadata.Metadata`` (SQLite in the gallery directory, image bytes in
its ``blobs/`` folder: the embedded default, one writer process) and ``index.postgres_metadata`` (a
PostgreSQL database shared by every replica). ``tests/index/test_metadata_contract.py`` runs one suite
over both. The shared types stay where every importer finds them today: ``NewItem``, ``MetadataError``,
``UnknownLabelError`` and ``content_hash`` in ``index.metadata``, ``ItemRecord`` in ``index.wal``.

``MetadataStore`` (both backends):

- ``add`` returns one id per item and whether it is new: content already present (same sha256, also twice
  in one call) keeps its id and is not stored again; an item that brings bytes for content stored without
  them gives that item its blob. Ids are never handed out again, even after their item is removed.
- ``remove`` deletes rows (returns how many were there); ``get``, ``ids``, ``count``, ``label_names`` and
  ``matching`` read. ``matching`` resolves a label filter (every ``name == value``) to the sorted allowed
  ids and raises ``UnknownLabelError`` for a name that no item has.
- A label value is an ``int`` (a binary attribute's 0/1, an index into a task's values) or a ``str`` (a
  category name from a user's ``labels.csv``, such as ``"green"``), normalised on every write and filter
  by ``model.data.base.as_label_value``: a text that spells an integer is that integer, so ``1`` and
  ``"1"`` name one value, and other texts are stripped.
- ``ids_by_hash``, ``store_blobs`` / ``read_blob`` (the image bytes by content hash), ``quick_check``
  (``"ok"`` or what is wrong) and ``close``.

The SQLite class has more, for galleries with a log (``next_id``, ``apply_add``, ``apply_remove``,
``applied_position``, ``backup``, ``blob_path``): those are not part of the contract.

``SharedMetadataStore`` (PostgreSQL) adds what the cluster write protocol of #14 needs:

- an add is first committed as *pending* (``add(items, pending=True)``), then the vectors go into every
  task's collection, then ``commit(ids)`` makes the items visible. Readers (``get``, ``ids``, ``count``,
  ``label_names``, ``matching``) never return a pending id; ``ids_by_hash`` does (a duplicate being added
  by another replica is still a duplicate), and ``states`` tells which are pending;
- ``pending(older_than_s)`` lists what a crashed replica left for a repair pass, which finishes it
  (``commit``) or rolls it back (``rollback``: deletes only rows still pending, so an add that a slow
  replica committed meanwhile stays). A delete removes the row first (``remove``), then the vectors;
- the gallery config (tasks, embedding size, model hash, store options) lives in the database, since
  replicas share no ``gallery.json``: ``config()`` and ``save_config`` (first writer wins, or a
  compare-and-set against the config the caller read).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from index.metadata import Metadata, MetadataError, NewItem
from index.wal import ItemRecord
from model.data.base import LabelValue

if TYPE_CHECKING:
    from index.postgres_metadata import PostgresMetadata

ItemState = Literal["pending", "committed"]
POSTGRES_SCHEMES = ("postgresql", "postgres")


class MetadataStore(Protocol):
    """What a gallery without a write-ahead log (Milvus) relies on; see the module docstring."""

    def add(self, items: Sequence[NewItem]) -> tuple[list[int], list[bool]]: ...

    def remove(self, ids: Sequence[int] | np.ndarray) -> int: ...

    def get(self, ids: Sequence[int] | np.ndarray) -> dict[int, ItemRecord]: ...

    def ids(self) -> np.ndarray: ...

    def count(self) -> int: ...

    def label_names(self) -> list[str]: ...

    def matching(self, conditions: Mapping[str, LabelValue]) -> np.ndarray: ...

    def ids_by_hash(self, hashes: Sequence[str]) -> dict[str, tuple[int, bool]]: ...

    def store_blobs(self, items: Sequence[NewItem]) -> None: ...

    def read_blob(self, digest: str) -> bytes | None: ...

    def quick_check(self) -> str: ...

    def close(self) -> None: ...


class SharedMetadataStore(MetadataStore, Protocol):
    """Metadata shared by replicas: pending/committed items and the gallery config (module docstring)."""

    def add(self, items: Sequence[NewItem], *, pending: bool = False) -> tuple[list[int], list[bool]]: ...

    def ids(self, *, include_pending: bool = False) -> np.ndarray: ...

    def commit(self, ids: Sequence[int] | np.ndarray) -> np.ndarray: ...

    def rollback(self, ids: Sequence[int] | np.ndarray) -> np.ndarray: ...

    def pending(self, older_than_s: float = 0.0) -> list[ItemRecord]: ...

    def states(self, ids: Sequence[int] | np.ndarray) -> dict[int, ItemState]: ...

    def config(self) -> dict[str, Any] | None: ...

    def save_config(
        self, config: Mapping[str, Any], *, expected: Mapping[str, Any] | None = None
    ) -> dict[str, Any]: ...


def is_postgres_url(url: str | None) -> bool:
    return url is not None and url.split(":", 1)[0].lower() in POSTGRES_SCHEMES


def open_metadata(
    url: str | None,
    root: Path,
    *,
    create: bool = False,
    read_only: bool = False,
    logged: bool = False,
) -> MetadataStore:
    """The metadata a URL selects: none, the SQLite file in ``root`` (``index.metadata.Metadata``);
    ``postgresql://user@host:port/database[?schema=name]``, that PostgreSQL database (the ``cluster``
    extra: psycopg 3). Anything else is a ``MetadataError``."""
    if url is None:
        return Metadata(root, create=create, read_only=read_only, logged=logged)
    if not is_postgres_url(url):
        raise MetadataError(
            f"metadata URL {url.split(':', 1)[0]}:… is not supported: use "
            "postgresql://user@host:port/database (or leave it unset for SQLite in the gallery directory)"
        )
    if logged:
        raise MetadataError("a PostgreSQL metadata database serves galleries without a write-ahead log only")
    try:
        from index.postgres_metadata import PostgresMetadata
    except ImportError as e:
        raise MetadataError(
            f"PostgreSQL metadata needs psycopg 3 ({e}): pip install 'modret[cluster]'"
        ) from None
    return PostgresMetadata(url, create=create, read_only=read_only)


if TYPE_CHECKING:  # mypy checks that both backends keep the contract

    def _conforms(sqlite: Metadata, postgres: PostgresMetadata) -> tuple[MetadataStore, SharedMetadataStore]:
        return sqlite, postgres
