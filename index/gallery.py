"""A gallery: metadata + one vector store + the model it was embedded with, behind one facade.

Layout of a gallery directory::

    gallery.json     backend, store options, task list, embedding size, model hash (written once)
    gallery.sqlite   metadata (index.metadata), WAL mode
    blobs/           uploaded image bytes, content-addressed
    store/           the vector store's generations (index.generations), or its Milvus Lite file
    writer.lock      flock held by the one process that opened the gallery for writing

Durability across the two halves: the metadata commits first and the store's ``save()`` is the commit
point of the vectors. An ``add`` is durable once a ``save`` that followed it returned; a ``remove`` is
durable as soon as it returns (the metadata row is gone, and a store that still holds the vectors after
a crash is corrected on the next open). Opening for writing repairs what a crash can leave behind:
metadata rows whose vectors were never saved are rolled back, vectors without a metadata row are removed,
and an id present in only some tasks (a Milvus crash inside ``add``) is removed. Read-only opens (``info``,
``verify`` beside a running service) repair nothing; they report.

Concurrency: searches go straight to the store (which takes a read lock per search); ``add`` and
``remove`` hold the gallery's writer lock so that the metadata and store halves of one call are never
interleaved with another writer's; ``save`` needs no gallery lock (the store snapshots under its read lock).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index.generations import GenerationError, Manifest
from index.metadata import ItemRecord, Metadata, NewItem
from index.store import SearchResult, VectorStore, as_ids, open_store, store_class
from model.durable import FileLock, LockHeld, atomic_write_bytes

log = logging.getLogger(__name__)

CONFIG = "gallery.json"
STORE_DIR = "store"


class GalleryError(RuntimeError):
    """A gallery that cannot be opened or used as asked; the message says why."""


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
    sizes: dict[str, int]  # bytes: store, metadata, blobs
    rejected_generations: list[str]


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


class Gallery:
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
        self.repairs: list[str] = []

    @property
    def tasks(self) -> list[str]:
        return list(self.config["tasks"])

    @property
    def model_hash(self) -> str:
        return str(self.config["model_hash"])

    @property
    def embedding_dim(self) -> int:
        return int(self.config["embedding_dim"])

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
    ) -> Gallery:
        """Create an empty gallery in ``root`` (which must not hold one yet) and open it for writing."""
        if (root / CONFIG).exists():
            raise GalleryError(f"{root} already holds a gallery; open it or choose another directory")
        store_class(backend)  # an unknown name fails here, before gallery.json records it
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "format_version": 1,
            "backend": backend,
            "store_options": dict(store_options or {}),
            "tasks": list(tasks),
            "embedding_dim": dim,
            "model_hash": model_hash,
        }
        atomic_write_bytes(root / CONFIG, json.dumps(config, indent=2).encode())
        return cls.open(root, model_hash=model_hash)

    @classmethod
    def open(cls, root: Path, *, model_hash: str | None = None, read_only: bool = False) -> Gallery:
        """Open the gallery in ``root``; ``model_hash`` (the run's) must match the one it was built with."""
        try:
            config = json.loads((root / CONFIG).read_text())
        except FileNotFoundError:
            raise GalleryError(f"{root} holds no gallery ({CONFIG} not found)") from None
        if model_hash is not None and model_hash != config["model_hash"]:
            raise GalleryError(
                f"{root} was built with model {config['model_hash'][:12]}…, the run's model is "
                f"{model_hash[:12]}…; rebuild the index with this run"
            )
        lock_file = None
        if not read_only:
            try:
                lock_file = FileLock(root / "writer.lock", blocking=False).acquire()
            except LockHeld:
                raise GalleryError(f"{root} is open for writing in another process") from None
        metadata: Metadata | None = None
        try:
            metadata = Metadata(root, read_only=read_only)
            store = open_store(
                config["backend"],
                root / STORE_DIR,
                tasks=config["tasks"],
                dim=config["embedding_dim"],
                model_hash=config["model_hash"],
                options=config["store_options"],
            )
        except BaseException as e:  # whatever failed, the writer lock and the database are let go
            if metadata is not None:
                metadata.close()
            if lock_file is not None:
                lock_file.release()
            if isinstance(e, GenerationError):
                raise GalleryError(str(e)) from e
            raise
        gallery = cls(root, config, store, metadata, lock_file)
        if not read_only:
            gallery._repair()
        return gallery

    def _repair(self) -> None:
        """Make metadata and store agree after a crash; see the module docstring."""
        per_task = [self.store.ids(task) for task in self.tasks]
        everywhere = per_task[0]
        for ids in per_task[1:]:
            everywhere = np.intersect1d(everywhere, ids)
        partial = np.setdiff1d(np.unique(np.concatenate(per_task)), everywhere)
        known = self.metadata.ids()
        unsaved = np.setdiff1d(known, everywhere)
        orphaned = np.setdiff1d(everywhere, known)
        if len(partial) or len(orphaned):
            self.store.remove(np.union1d(partial, orphaned))
        if len(unsaved):
            self.metadata.remove(unsaved)
        for count, what in (
            (len(unsaved), "added items whose vectors were never saved were rolled back"),
            (len(orphaned), "removed items still in the store were removed from it"),
            (len(partial), "ids present in only some tasks were removed"),
        ):
            if count:
                self.repairs.append(f"{count} {what}")
                log.warning("%s: %d %s", self.root, count, what)

    # --- writing -------------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise GalleryError(f"{self.root} is open read-only")

    def add(self, items: Sequence[NewItem], vectors: np.ndarray) -> list[int]:
        """Add ``items`` with their embeddings ``vectors`` (N, T, D) in task order; returns their ids.

        Content already in the gallery (same sha256) keeps its id and is not stored again."""
        self._check_writable()
        expected = (len(items), len(self.tasks), self.embedding_dim)
        if vectors.shape != expected:
            raise ValueError(f"vectors have shape {vectors.shape}, expected {expected}")
        with self._write_lock:
            ids, new = self.metadata.add(items)
            rows = [i for i, is_new in enumerate(new) if is_new]
            # A batch may hold the same content twice: only its first occurrence is new.
            new_ids = np.array([ids[i] for i in rows], dtype=np.int64)
            if len(new_ids):
                try:
                    self.store.add(new_ids, {t: vectors[rows, j] for j, t in enumerate(self.tasks)})
                except BaseException:
                    self.metadata.remove(new_ids)
                    raise
        return ids

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        self._check_writable()
        with self._write_lock:
            removed = self.metadata.remove(ids)
            self.store.remove(np.asarray(ids, dtype=np.int64))
        return removed

    def save(self) -> Manifest:
        self._check_writable()
        return self.store.save()

    # --- reading -------------------------------------------------------------------------------------

    def search(
        self, task: str, queries: np.ndarray, k: int, filter: Mapping[str, int] | None = None
    ) -> SearchResult:
        """Top ``k`` gallery ids and cosine scores under ``task``; ``filter`` restricts to items whose
        labels equal the given values (e.g. ``{"Male": 1}``)."""
        allowed = None if not filter else self.metadata.matching(filter)
        return self.store.search(task, queries, k, allowed)

    def vectors(self, ids: Sequence[int] | np.ndarray, task: str) -> np.ndarray:
        """The stored (n, D) embeddings of ``ids`` under ``task``, row i for ``ids[i]`` (no re-embedding).

        Raises ``UnknownTaskError`` for a task the gallery was not built for and ``UnknownIdError``
        (naming them) for ids without vectors. Exact copies except for approximate stores that keep
        compressed codes (faiss IVF-PQ), which return their decoded vectors."""
        return self.store.get(task, as_ids(ids))

    def items(self, ids: Sequence[int] | np.ndarray) -> dict[int, ItemRecord]:
        return self.metadata.get(ids)

    def blob_path(self, item: ItemRecord) -> Path | None:
        return self.metadata.blob_path(item.content_hash) if item.has_blob else None

    def info(self) -> GalleryInfo:
        manifest = self.store.manifest
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
                "metadata": sum(_tree_size(p) for p in self.root.glob("gallery.sqlite*")),
                "blobs": _tree_size(self.metadata.blob_dir),
            },
            rejected_generations=list(self.store.generations.rejected),
        )

    def verify(self, model_hash: str | None = None) -> VerifyReport:
        """Checksums of the served generation, model match, and every metadata id in every task."""
        report = VerifyReport()
        # A newer generation that failed to load is a problem even though an older one is served.
        report.problems += [f"refused generation: {reason}" for reason in self.store.generations.rejected]
        manifest = self.store.manifest
        if manifest is None:
            report.problems.append("no saved generation: the gallery was never saved")
        else:
            try:
                self.store.generations.verify(
                    manifest.generation, model_hash=self.model_hash, embedding_dim=None
                )
                report.checked.append(f"generation {manifest.generation}: manifest and file checksums")
            except GenerationError as e:
                report.problems.append(str(e))
        if model_hash is not None and model_hash != self.model_hash:
            report.problems.append(
                f"model mismatch: gallery built with {self.model_hash[:12]}…, run has {model_hash[:12]}…"
            )
        else:
            report.checked.append("model hash" + (" matches the run" if model_hash else " recorded"))
        known = self.metadata.ids()
        for task in self.tasks:
            stored = self.store.ids(task)
            missing = np.setdiff1d(known, stored)
            extra = np.setdiff1d(stored, known)
            if len(missing):
                report.problems.append(
                    f"task {task!r}: {len(missing)} ids missing, e.g. {missing[:5].tolist()}"
                )
            if len(extra):
                report.problems.append(
                    f"task {task!r}: {len(extra)} ids without metadata, e.g. {extra[:5].tolist()}"
                )
        report.checked.append(f"{len(known)} ids in each of {len(self.tasks)} tasks")
        with_blobs = [r for r in self.metadata.get(known).values() if r.has_blob]
        for record in with_blobs:
            path = self.metadata.blob_path(record.content_hash)
            if not path.is_file():
                report.problems.append(f"item {record.id}: blob {path.name} is missing")
        report.checked.append(f"{len(with_blobs)} blobs present")
        return report

    def close(self) -> None:
        self.store.close()
        self.metadata.close()
        if self._lock_file is not None:
            self._lock_file.release()
