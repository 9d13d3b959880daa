"""Gallery metadata in SQLite (WAL mode) and the content-addressed blob folder of gallery images' bytes.

One row per gallery image: a stable integer id (``AUTOINCREMENT``, so an id is never handed out again,
even after its item is removed), the source path or uploaded file name, the sha256 of the image's bytes
(unique: adding the same content again returns the existing id instead of storing it twice), width and
height of the original image, its known attribute labels, and when it was added (ISO-8601, UTC).

Labels are kept twice on purpose: as JSON on the item (to show them) and as rows of a ``labels`` table
indexed by (name, value), so that a filter such as ``{"Male": 1, "colour": "green"}`` resolves to the
allowed id set with one indexed query per condition. A label value is its name as the dataset or the
uploader spells it (``model.data.base.LabelValue``): an integer when it spells one (binary attributes are
0/1), else the text; the ``value`` column's integer affinity keeps ``1`` and ``"1"`` one value. Unknown
labels are simply absent.

The bytes of gallery images (uploads, and images indexed by ``modret index build`` unless it was told
``--no-store-images``) live in ``blobs/<first 2 hex>/<sha256>``, written through a temporary file, fsync
and atomic rename before the row that refers to them is committed, so a crash leaves at most an
unreferenced blob, never a row without its blob. Blobs are not deleted with their row: the same content
may come back, and content addressing makes keeping it harmless. Adding bytes for content that is already
an item without them (a gallery built without its images, then the same image uploaded) gives that item
its blob.

Galleries with a write-ahead log (``index.wal``; the faiss backend) record writes there first: the
metadata is then a view that the log can rebuild, ``apply`` writes the log's records with the ids the log
assigned and remembers the position of the last one applied (table ``log_state``, in the same
transaction), so that opening replays exactly the records after it. Such galleries open the database with
``synchronous=NORMAL`` (no fsync per commit: the log's fsync is the durable one); galleries without a log
(Milvus) keep ``synchronous=FULL``, which makes each committed transaction durable. WAL journal mode in
both: readers never block the writer. One connection is shared by the threads of a process behind a lock
(SQLite serialises writers anyway).

Opening an existing gallery never creates the schema: an emptied, replaced or unreadable file is a
``MetadataError`` (the gallery refuses to start and says how to recover), never an empty gallery that
would then disagree with the vectors. A read-only open reads inside one transaction, so every query of a
``verify`` sees the same state as the ``log_state`` position it read first.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index.gallery_files import refused_write
from index.wal import ItemRecord
from model.data.base import LabelValue, as_label_value
from model.durable import atomic_write_bytes, bytes_sha256, fsync_path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    content_hash TEXT NOT NULL UNIQUE,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    labels TEXT NOT NULL,
    has_blob INTEGER NOT NULL,
    added_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    item_id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (item_id, name)
);
CREATE INDEX IF NOT EXISTS labels_by_value ON labels(name, value, item_id);
"""
_LOG_STATE = """
CREATE TABLE IF NOT EXISTS log_state (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    applied INTEGER NOT NULL
);
INSERT OR IGNORE INTO log_state (id, applied) VALUES (0, 0);
"""


_BLOB_WRITERS = 8  # blobs written (and fsynced) at once by one add


def content_hash(data: bytes) -> str:
    return bytes_sha256(data)


@dataclass(frozen=True)
class NewItem:
    """An image to add. ``data`` (the encoded image whose sha256 is ``content_hash``) is kept as a blob
    when given (uploads, and builds that keep their images)."""

    source: str
    content_hash: str
    width: int
    height: int
    labels: dict[str, LabelValue] = field(default_factory=dict)
    data: bytes | None = None


class UnknownLabelError(LookupError):
    """A filter names a label that no gallery item has."""


class MetadataError(RuntimeError):
    """gallery.sqlite is missing, empty, replaced or unreadable; the message says which."""


DB_NAME = "gallery.sqlite"


def _row(row: Sequence[Any]) -> ItemRecord:
    return ItemRecord(
        int(row[0]), str(row[1]), str(row[2]), int(row[3]), int(row[4]), json.loads(str(row[5])),
        bool(row[6]), str(row[7]),
    )  # fmt: skip


class Metadata:
    def __init__(
        self,
        root: Path,
        *,
        read_only: bool = False,
        create: bool = False,
        logged: bool = False,
        path: Path | None = None,
    ) -> None:
        """Open ``root/gallery.sqlite`` (or ``path``); ``create`` makes the schema (a new gallery),
        ``logged`` a gallery whose writes go through the write-ahead log (see the module docstring)."""
        self.path = path or root / DB_NAME
        self.blob_dir = root / "blobs"
        self._lock = threading.Lock()
        if not create and not self.path.is_file():
            raise MetadataError(f"{self.path.name} is missing")
        try:
            if read_only:
                # On a read-only mount SQLite cannot make the WAL's shared-memory file: nothing can write
                # there, so the database is opened as immutable (no locks, no -shm) instead.
                uri = f"file:{self.path}?mode=ro" + ("" if os.access(root, os.W_OK) else "&immutable=1")
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
            else:
                root.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, check_same_thread=False)
            try:
                self._open(read_only=read_only, create=create, logged=logged)
            except BaseException:
                self._db.close()
                raise
        except sqlite3.DatabaseError as e:
            raise MetadataError(f"{self.path.name} is not a readable gallery database ({e})") from e

    def _open(self, *, read_only: bool, create: bool, logged: bool) -> None:
        db = self._db
        if not read_only:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'NORMAL' if logged else 'FULL'}")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not create and not {"items", "labels"} <= tables:
            raise MetadataError(
                f"{self.path.name} holds no gallery metadata (tables {sorted(tables) or 'none'}): "
                "it was emptied or replaced"
            )
        if create:
            db.executescript(_SCHEMA)
        if create and logged:
            db.executescript(_LOG_STATE)
        db.execute("PRAGMA foreign_keys=ON")
        if read_only:
            db.execute("BEGIN")  # one snapshot for every later read (see the module docstring)
            db.execute("SELECT COUNT(*) FROM items").fetchone()

    def applied_position(self) -> int | None:
        """Position of the last log record applied; ``None`` for a gallery without a log."""
        with self._lock:
            try:
                row = self._db.execute("SELECT applied FROM log_state WHERE id = 0").fetchone()
            except sqlite3.OperationalError:  # no such table: written before the log existed
                return None
        return None if row is None else int(row[0])

    def start_log(self) -> None:
        """Begin recording log positions (a gallery from before the log, opened for writing)."""
        with self._transaction() as db:
            db.executescript(_LOG_STATE)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._db:  # the connection as context manager commits, or rolls back on error
            yield self._db

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / digest[:2] / digest

    def _store_blobs(self, items: Sequence[NewItem]) -> None:
        """Durably write the blobs of ``items`` not stored yet: each file fsynced, then each folder once.
        Several at a time: fsyncs in flight together share the file system's journal commits, which
        writes a build's thousands of small images about 3× faster than one fsync after another."""
        pending = {item.content_hash: item.data for item in items if item.data is not None}
        if not pending:
            return
        with ThreadPoolExecutor(min(_BLOB_WRITERS, len(pending))) as pool:
            folders = set(pool.map(lambda blob: self._write_blob(*blob), pending.items()))
            list(pool.map(fsync_path, {folder for folder in folders if folder is not None}))

    def _write_blob(self, digest: str, data: bytes) -> Path | None:
        """Write the blob (file fsynced) unless present; returns the folder whose entry is to be fsynced."""
        path = self.blob_path(digest)
        if path.exists():
            return None
        atomic_write_bytes(path, data, sync_dir=False)  # the folder is fsynced once per add, by the caller
        return path.parent

    def store_blobs(self, items: Sequence[NewItem]) -> None:
        """Durably write the image bytes of ``items`` (before any record refers to them). A failure
        leaves at most unreferenced blobs (content-addressed: a later add of the same image reuses them)
        and raises ``StorageFull`` when the disk had no room, else ``GalleryError``."""
        try:
            self._store_blobs(items)
        except OSError as e:
            message = f"{self.blob_dir}: the images could not be stored ({e}); nothing was added"
            raise refused_write(self.blob_dir, e, message) from e

    def read_blob(self, digest: str) -> bytes | None:
        """The stored bytes of content ``digest``, None when none are stored."""
        path = self.blob_path(digest)
        return path.read_bytes() if path.is_file() else None

    def ids_by_hash(self, hashes: Sequence[str]) -> dict[str, tuple[int, bool]]:
        """``content_hash -> (id, has_blob)`` of the items already holding those contents."""
        out: dict[str, tuple[int, bool]] = {}
        wanted = list(dict.fromkeys(hashes))
        with self._lock:
            rows = self._rows_where_in("content_hash, id, has_blob", "content_hash", wanted)
        out.update({str(r[0]): (int(r[1]), bool(r[2])) for r in rows})
        return out

    def next_id(self) -> int:
        """The id the next new item gets: above every id ever handed out (AUTOINCREMENT's counter)."""
        with self._lock:
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
            top = self._db.execute("SELECT MAX(id) FROM items").fetchone()
        return max(int(row[0]) if row else 0, int(top[0] or 0)) + 1

    def apply_add(self, items: Sequence[ItemRecord], blob_ids: Sequence[int], position: int) -> None:
        """Insert logged items under their logged ids and mark ``blob_ids`` as having their bytes."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO items (id, source, content_hash, width, height, labels, has_blob, added_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (i.id, i.source, i.content_hash, i.width, i.height,
                     json.dumps(i.labels, sort_keys=True), i.has_blob, i.added_at)
                    for i in items
                ],
            )  # fmt: skip
            db.executemany(
                "INSERT INTO labels (item_id, name, value) VALUES (?, ?, ?)",
                [(i.id, name, as_label_value(value)) for i in items for name, value in i.labels.items()],
            )
            db.executemany("UPDATE items SET has_blob = 1 WHERE id = ?", [(int(i),) for i in blob_ids])
            db.execute("UPDATE log_state SET applied = ? WHERE id = 0", (position,))

    def apply_remove(self, ids: Sequence[int], position: int) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])
            db.execute("UPDATE log_state SET applied = ? WHERE id = 0", (position,))

    def backup(self, target: Path) -> None:
        """Copy the database, consistently, to ``target`` through a second connection (the writer is not
        held up: in WAL mode a reader sees one committed state while writes go on)."""
        source = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        destination = sqlite3.connect(target)
        try:
            source.backup(destination)
        finally:
            destination.close()
            source.close()

    def quick_check(self) -> str:
        with self._lock:
            return str(self._db.execute("PRAGMA quick_check").fetchone()[0])

    def add(self, items: Sequence[NewItem]) -> tuple[list[int], list[bool]]:
        """Ids of ``items`` (existing ones for content already present) and whether each is new."""
        self._store_blobs(items)
        ids: list[int] = []
        new: list[bool] = []
        added_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self._transaction() as db:
            for item in items:
                row = db.execute(
                    "SELECT id FROM items WHERE content_hash = ?", (item.content_hash,)
                ).fetchone()
                if row is not None:
                    if item.data is not None:
                        db.execute("UPDATE items SET has_blob = 1 WHERE id = ? AND NOT has_blob", (row[0],))
                    ids.append(int(row[0]))
                    new.append(False)
                    continue
                labels = {name: as_label_value(value) for name, value in item.labels.items()}
                cursor = db.execute(
                    "INSERT INTO items (source, content_hash, width, height, labels, has_blob, added_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        item.source,
                        item.content_hash,
                        item.width,
                        item.height,
                        json.dumps(labels, sort_keys=True),
                        item.data is not None,
                        added_at,
                    ),
                )
                item_id = int(cursor.lastrowid or 0)
                db.executemany(
                    "INSERT INTO labels (item_id, name, value) VALUES (?, ?, ?)",
                    [(item_id, name, value) for name, value in labels.items()],
                )
                ids.append(item_id)
                new.append(True)
        return ids, new

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        with self._transaction() as db:
            cursor = db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])
            return cursor.rowcount

    def _rows_where_in(self, columns: str, key: str, values: Sequence[Any]) -> list[Any]:
        """``columns`` of the items whose ``key`` is one of ``values``, queried in chunks that stay under
        SQLite's bound-parameter limit. Call with ``self._lock`` held."""
        rows: list[Any] = []
        for start in range(0, len(values), 500):
            chunk = list(values[start : start + 500])
            placeholders = ",".join("?" * len(chunk))
            query = f"SELECT {columns} FROM items WHERE {key} IN ({placeholders})"
            rows += self._db.execute(query, chunk).fetchall()
        return rows

    def get(self, ids: Sequence[int] | np.ndarray) -> dict[int, ItemRecord]:
        wanted = [int(i) for i in ids]
        records: dict[int, ItemRecord] = {}
        with self._lock:
            rows = self._rows_where_in(
                "id, source, content_hash, width, height, labels, has_blob, added_at", "id", wanted
            )
        for row in rows:
            records[row[0]] = _row(row)
        return records

    def ids(self) -> np.ndarray:
        with self._lock:
            rows = self._db.execute("SELECT id FROM items ORDER BY id").fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def count_without_blobs(self) -> int:
        """Items whose image bytes were not kept (``--no-store-images``): they cannot be embedded anew."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM items WHERE NOT has_blob").fetchone()[0])

    def label_names(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT name FROM labels ORDER BY name")]

    def matching(self, conditions: Mapping[str, LabelValue]) -> np.ndarray:
        """Sorted ids of the items whose labels satisfy every ``name == value`` condition."""
        known = set(self.label_names())
        unknown = [name for name in conditions if name not in known]
        if unknown:
            names = ", ".join(sorted(known)) or "none"
            raise UnknownLabelError(f"no gallery item has a label {unknown[0]!r}; known labels: {names}")
        if not conditions:
            return self.ids()
        query = " INTERSECT ".join(
            "SELECT item_id FROM labels WHERE name = ? AND value = ?" for _ in conditions
        )
        params = [p for name, value in conditions.items() for p in (name, as_label_value(value))]
        with self._lock:
            rows = self._db.execute(query, params).fetchall()
        return np.array(sorted(r[0] for r in rows), dtype=np.int64)

    def close(self) -> None:
        with self._lock:
            self._db.close()
