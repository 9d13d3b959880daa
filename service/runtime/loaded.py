"""The loaded model and gallery as one object, and the blocking steps that bring it up and down.

``load(settings, metrics)`` loads the run, opens (or creates) its gallery (replaying its write-ahead log)
and starts the batcher; ``warm_up`` runs one batch through the model under every task and one search per
task; ``shut_down`` stops the batcher and closes the gallery, which answers the writes in flight and, with
``save_on_shutdown``, snapshots what the log holds. All three block: the app calls them in a worker
thread. ``preflight`` is the cheap part of opening, for ``modret serve`` to refuse a damaged gallery with
one line before the server starts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from index.gallery import Gallery, GalleryError
from model.run import METRICS, LoadedRun, load_run
from service.runtime.batcher import Batcher
from service.runtime.images import DecodeBudget
from service.runtime.writes import GalleryWriter
from service.settings import Settings
from service.telemetry import ServiceMetrics

log = logging.getLogger("service.runtime")


@dataclass
class Loaded:
    run: LoadedRun
    gallery: Gallery
    writer: GalleryWriter
    batcher: Batcher
    decode_budget: DecodeBudget
    task_metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return self.run.task_names

    @property
    def model_name(self) -> str:
        return self.run.run_dir.resolve().name


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


def open_gallery(settings: Settings, model_hash: str, tasks: list[str], dim: int) -> Gallery:
    policy: dict[str, Any] = {
        "snapshot_every_records": settings.snapshot_every_records,
        "snapshot_every_s": settings.snapshot_every_s,
    }
    if settings.create_index and not (settings.index_dir / "gallery.json").exists():
        log.info("creating an empty gallery", extra={"fields": {"index_dir": str(settings.index_dir)}})
        return Gallery.create(settings.index_dir, tasks=tasks, dim=dim, model_hash=model_hash, **policy)
    gallery = Gallery.open(settings.index_dir, model_hash=model_hash, **policy)
    if gallery.tasks != tasks:
        gallery.close()
        raise GalleryError(f"{settings.index_dir} was built for tasks {gallery.tasks}, the model has {tasks}")
    return gallery


def load(settings: Settings, service_metrics: ServiceMetrics) -> Loaded:
    """Load the run, open the gallery, start the batcher (blocking)."""
    run = load_run(settings.run_dir, device=settings.device)
    gallery = open_gallery(settings, run.model_hash, run.task_names, run.embedding_dim)
    batcher = Batcher(
        run.model,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        metrics=service_metrics,
        normalize=run.preprocess.normalize,
        max_queue_delay_s=settings.queue_delay_budget_s,
        max_queued_rows=settings.max_queued_rows,
    )
    batcher.start()
    budget = DecodeBudget(settings.max_decode_bytes)
    return Loaded(run, gallery, GalleryWriter(gallery), batcher, budget, read_task_metrics(run))


def warm_up(loaded: Loaded) -> None:
    """One batch through the model under every task and one search per task."""
    size = loaded.run.preprocess.image_size
    pixels = torch.zeros((1, 3, size, size), dtype=torch.uint8)  # what requests send: uint8 pixels
    vectors = loaded.batcher.submit(pixels, None).result(timeout=300)
    for position, task in enumerate(loaded.tasks):
        query = np.ascontiguousarray(vectors.vectors[0, position][None, :], dtype=np.float32)
        loaded.gallery.store.search(task, query, 1)


def preflight(settings: Settings) -> str | None:
    """Why the gallery cannot be served (one line), from the checks that need no loading; else None."""
    if settings.create_index and not (settings.index_dir / "gallery.json").exists():
        return None
    try:
        Gallery.preflight(settings.index_dir)
    except GalleryError as e:
        return str(e)
    return None


def shut_down(loaded: Loaded, settings: Settings) -> None:
    loaded.batcher.stop()
    loaded.gallery.close(snapshot=settings.save_on_shutdown)
    log.info("gallery closed", extra={"fields": {"generation": loaded.writer.generation()}})
