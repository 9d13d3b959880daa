"""The loaded model and gallery as one object, and the blocking steps that bring it up and down.

``load(settings, metrics)`` loads the run, opens (or creates) its gallery (replaying its write-ahead log)
and starts the batcher; ``warm_up`` runs one batch through the model under every task and one search per
task; ``shut_down`` stops the batcher and closes the gallery, which answers the writes in flight and, with
``save_on_shutdown``, snapshots what the log holds. All three block: the app calls them in a worker
thread. ``preflight`` is the cheap part of opening, for ``modret serve`` to refuse a damaged gallery with
one line before the server starts.

The run and the gallery need not have the same tasks: a gallery records per-task fingerprints, so a child
run (``modret task add``/``remove``) serves it for every task it embeds as when it was indexed
(``indexed``); a run task without an index is logged, listed as not indexed by ``GET /tasks`` and
refused by a search (``TaskNotIndexed``), and a gallery task the run no longer has makes uploads refuse
(``GalleryOutOfDate``: nothing could embed them under it). ``reload`` (``POST /admin/reload``) loads the
run from the settings again and checks it against the open gallery (the service holds the gallery's
writer lock, so nothing else changed it), for the app to swap in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from index.committer import CommitterError
from index.gallery import Gallery, GalleryError
from index.gallery_files import check_writable
from index.generations import GenerationError
from index.metadata import MetadataError
from index.served import ServedGallery
from index.store import BackendUnavailableError, UnknownBackendError
from index.tasks import check_model
from index.wal import LogCorruptError
from model.pretrained import PretrainedError
from model.run import METRICS, LoadedRun, RunError, load_run
from model.tasks import TaskError
from service.runtime.batcher import Batcher
from service.runtime.errors import TaskNotIndexed
from service.runtime.images import DecodeBudget
from service.runtime.writes import GalleryWriter
from service.settings import Settings
from service.telemetry import ServiceMetrics

log = logging.getLogger("service.runtime")

# What ``load`` raises for a run or gallery that cannot be served as they are (missing, damaged, another
# model's, locked by another writer, an engine away): the message says what is wrong and what to do, so
# the server reports it in one line, where any other exception is a bug and keeps its traceback.
LOAD_ERRORS: tuple[type[Exception], ...] = (
    RunError,
    TaskError,
    PretrainedError,
    GalleryError,
    GenerationError,
    LogCorruptError,
    CommitterError,
    MetadataError,
    UnknownBackendError,
    BackendUnavailableError,
    OSError,  # also StoreUnavailable, LockHeld: a path that is not a directory, permissions, a full disk
)


@dataclass
class Loaded:
    run: LoadedRun
    gallery: ServedGallery
    writer: GalleryWriter
    batcher: Batcher
    decode_budget: DecodeBudget
    task_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    indexed: list[str] = field(default_factory=list)  # run tasks the gallery has a valid index for
    # the run directory's name, a symlink's target as it was at load (what serves); resolved once, not
    # once per response
    model_name: str = field(init=False)

    def __post_init__(self) -> None:
        self.model_name = self.run.run_dir.resolve().name

    @property
    def tasks(self) -> list[str]:
        """The run's tasks (positions in its embeddings), indexed or not."""
        return self.run.task_names

    @property
    def not_indexed(self) -> list[str]:
        return [task for task in self.tasks if task not in self.indexed]

    def check_indexed(self, names: list[str]) -> None:
        """``TaskNotIndexed`` for the first of ``names`` the gallery cannot search."""
        for name in names:
            if name not in self.indexed:
                raise TaskNotIndexed(name, self.indexed)


def read_task_metrics(run: LoadedRun) -> dict[str, dict[str, float]]:
    """Per-task test metrics (triplet accuracy, mAP, P@10) from the run's metrics.json, when present."""
    path = run.run_dir / METRICS
    try:
        data: Any = json.loads(path.read_text())
        tasks = data["test"]["tasks"]
        return {
            str(name): {str(k): float(v) for k, v in values.items() if isinstance(v, int | float)}
            for name, values in tasks.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def served_tasks(gallery: ServedGallery, run: LoadedRun) -> list[str]:
    """The run's tasks (in its order) that ``gallery`` has a valid index for; logs the others."""
    check = check_model(gallery.root, gallery.config, run.model_hash, run.fingerprints)
    valid = check.valid if check is not None else gallery.tasks
    indexed = [task for task in run.task_names if task in valid]
    for task in run.task_names:
        if task not in indexed:
            log.warning(
                "task not indexed: POST /admin/tasks/TASK/index (or `modret index add-task`) to search it",
                extra={"fields": {"task": task, "index_dir": str(gallery.root)}},
            )
    dropped = [task for task in gallery.tasks if task not in run.task_names]
    if dropped:
        log.warning(
            "the gallery indexes tasks the run lacks: uploads are refused until `modret index remove-task`",
            extra={"fields": {"tasks": dropped, "index_dir": str(gallery.root)}},
        )
    return indexed


def open_gallery(settings: Settings, run: LoadedRun) -> ServedGallery:
    """Open (or, with ``create_index``, create) the gallery of ``settings``: with ``metadata_url`` the
    gallery that replicas share (``index.shared_gallery``: PostgreSQL + the Milvus server of
    ``milvus_uri``; a repair pass runs first), else the one in ``index_dir``, whose store options the
    Milvus settings, when set, override (``Settings.store_overrides``)."""
    if settings.metadata_url is not None:
        return open_shared_gallery(settings, run)
    policy: dict[str, Any] = {
        "snapshot_every_records": settings.snapshot_every_records,
        "snapshot_every_s": settings.snapshot_every_s,
        "store_overrides": settings.store_overrides(),
    }
    fingerprints = run.fingerprints
    if settings.create_index and not (settings.index_dir / "gallery.json").exists():
        log.info("creating an empty gallery", extra={"fields": {"index_dir": str(settings.index_dir)}})
        return Gallery.create(
            settings.index_dir,
            tasks=run.task_names,
            dim=run.embedding_dim,
            model_hash=run.model_hash,
            fingerprints=fingerprints,
            **settings.new_gallery_store(),
            **policy,
        )
    gallery = Gallery.open(settings.index_dir, model_hash=run.model_hash, fingerprints=fingerprints, **policy)
    if gallery.embedding_dim != run.embedding_dim:
        gallery.close()
        raise GalleryError(
            f"{settings.index_dir} holds {gallery.embedding_dim}-dimensional vectors, the model makes "
            f"{run.embedding_dim}: rebuild the index with this run"
        )
    return gallery


def open_shared_gallery(settings: Settings, run: LoadedRun) -> ServedGallery:
    from index.shared_gallery import SharedGallery  # psycopg and pymilvus: only where replicas run

    assert settings.metadata_url is not None
    token = settings.milvus_token.get_secret_value() if settings.milvus_token is not None else None
    gallery = SharedGallery.open(
        settings.metadata_url,
        milvus_uri=settings.milvus_uri,
        milvus_token=token,
        collection_prefix=settings.milvus_collection_prefix,
        root=settings.index_dir,
        create=settings.create_index,
        tasks=run.task_names,
        dim=run.embedding_dim,
        model_hash=run.model_hash,
        fingerprints=run.fingerprints,
    )
    for line in gallery.repairs:
        log.warning("repair on start: %s", line, extra={"fields": {"gallery": gallery.where}})
    return gallery


def _batcher(run: LoadedRun, settings: Settings, service_metrics: ServiceMetrics) -> Batcher:
    batcher = Batcher(
        run.model,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        metrics=service_metrics,
        normalize=run.preprocess.normalize,
        max_queue_delay_s=settings.queue_delay_budget_s,
        max_queued_rows=settings.max_queued_rows,
        threads=settings.model_threads,
    )
    batcher.start()
    return batcher


def load(settings: Settings, service_metrics: ServiceMetrics) -> Loaded:
    """Load the run, open the gallery, start the batcher (blocking)."""
    run = load_run(settings.run_dir, device=settings.device)
    gallery = open_gallery(settings, run)
    try:
        indexed = served_tasks(gallery, run)
    except GalleryError:
        gallery.close()
        raise
    batcher = _batcher(run, settings, service_metrics)
    budget = DecodeBudget(settings.max_decode_bytes)
    writer = GalleryWriter(gallery)
    return Loaded(run, gallery, writer, batcher, budget, read_task_metrics(run), indexed)


def reload(current: Loaded, settings: Settings, service_metrics: ServiceMetrics) -> Loaded:
    """The run loaded again from ``settings.run_dir`` over the open gallery, warmed up, for the caller
    to swap in (blocking). Raises (``RunError``, ``GalleryError``, ``OSError``) with the old state
    untouched when the run cannot be loaded or cannot serve the gallery."""
    run = load_run(settings.run_dir, device=settings.device)
    if run.embedding_dim != current.gallery.embedding_dim:
        raise GalleryError(
            f"the run at {settings.run_dir} makes {run.embedding_dim}-dimensional vectors, the gallery holds "
            f"{current.gallery.embedding_dim}"
        )
    indexed = served_tasks(current.gallery, run)
    loaded = Loaded(
        run,
        current.gallery,
        current.writer,
        _batcher(run, settings, service_metrics),
        current.decode_budget,
        read_task_metrics(run),
        indexed,
    )
    try:
        if settings.warmup:
            warm_up(loaded)
    except BaseException:
        loaded.batcher.stop()
        raise
    return loaded


def warm_up(loaded: Loaded) -> None:
    """One batch through the model under every task and one search per task."""
    size = loaded.run.preprocess.image_size
    pixels = torch.zeros((1, 3, size, size), dtype=torch.uint8)  # what requests send: uint8 pixels
    vectors = loaded.batcher.submit(pixels, None).result(timeout=300)
    for task in loaded.indexed:
        position = loaded.tasks.index(task)
        query = np.ascontiguousarray(vectors.vectors[0, position][None, :], dtype=np.float32)
        loaded.gallery.store.search(task, query, 1)


def preflight(settings: Settings) -> str | None:
    """Why the gallery cannot be served (one line), from the checks that need no loading; else None."""
    if settings.metadata_url is not None:  # a shared gallery: its engines are checked on open
        return None if settings.milvus_uri else "MODRET_METADATA_URL needs MODRET_MILVUS_URI (the vectors)"
    if settings.create_index and not (settings.index_dir / "gallery.json").exists():
        return None
    try:
        Gallery.preflight(settings.index_dir)
        check_writable(settings.index_dir)  # the service opens it for writing
    except GalleryError as e:
        return str(e)
    except OSError as e:  # a path that is not a directory, or one this user cannot read
        return f"{settings.index_dir}: cannot open the gallery ({e.strerror or e}: {e.filename or ''})"
    return None


def shut_down(loaded: Loaded, settings: Settings) -> None:
    loaded.batcher.stop()
    try:
        loaded.gallery.close(snapshot=settings.save_on_shutdown)
    except Exception as e:  # the final snapshot (a full disk, say): every acknowledged write is logged
        log.error(
            "gallery closed without its final snapshot; the next start replays the log",
            extra={"fields": {"reason": repr(e)}},
        )
        return
    log.info("gallery closed", extra={"fields": {"generation": loaded.writer.generation()}})
