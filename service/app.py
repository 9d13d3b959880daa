"""The FastAPI application: ``create_app(settings)``.

The lifespan loads the run and opens the gallery (in a worker thread), starts the batcher, runs a
warm-up pass (one batch through the model and one search per task) and only then reports ready. On
shutdown readiness goes to 503 first, the batcher finishes its queued jobs, and the gallery is saved.

Middleware, outermost first: request log (request id, latency metric) → body limit → request timeout →
CORS (only when origins are configured) → routes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from index.gallery import Gallery, GalleryError
from model.run import load_run
from service.batcher import Batcher
from service.body_limit import BodyLimitMiddleware
from service.errors import install_error_handlers
from service.gallery_writes import GalleryWriter
from service.json_logs import configure_logging
from service.metrics import ServiceMetrics
from service.request_log import RequestLogMiddleware
from service.request_timeout import RequestTimeoutMiddleware
from service.routes import health, images, metrics, search, tasks, ui
from service.settings import Settings
from service.state import Loaded, ServiceState, read_task_metrics

log = logging.getLogger("service.app")


def open_gallery(settings: Settings, model_hash: str, tasks: list[str], dim: int) -> Gallery:
    if settings.create_index and not (settings.index_dir / "gallery.json").exists():
        log.info("creating an empty gallery", extra={"fields": {"index_dir": str(settings.index_dir)}})
        return Gallery.create(settings.index_dir, tasks=tasks, dim=dim, model_hash=model_hash)
    gallery = Gallery.open(settings.index_dir, model_hash=model_hash)
    if gallery.tasks != tasks:
        gallery.close()
        raise GalleryError(f"{settings.index_dir} was built for tasks {gallery.tasks}, the model has {tasks}")
    return gallery


def load_service(settings: Settings, service_metrics: ServiceMetrics) -> Loaded:
    """Load the run, open the gallery, start the batcher (blocking)."""
    run = load_run(settings.run_dir, device=settings.device)
    gallery = open_gallery(settings, run.model_hash, run.task_names, run.embedding_dim)
    batcher = Batcher(
        run.model,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        metrics=service_metrics,
    )
    batcher.start()
    return Loaded(run, gallery, GalleryWriter(gallery), batcher, read_task_metrics(run))


def warm_up(loaded: Loaded) -> None:
    """One batch through the model under every task and one search per task."""
    size = loaded.run.preprocess.image_size
    pixels = torch.zeros((1, 3, size, size))
    vectors = loaded.batcher.submit(pixels, None).result(timeout=300)
    for position, task in enumerate(loaded.tasks):
        query = np.ascontiguousarray(vectors.vectors[0, position][None, :], dtype=np.float32)
        loaded.gallery.store.search(task, query, 1)


def shut_down(loaded: Loaded, settings: Settings) -> None:
    loaded.batcher.stop()
    try:
        if settings.save_on_shutdown and loaded.writer.dirty:
            loaded.writer.save_through()
            log.info("gallery saved", extra={"fields": {"generation": loaded.writer.generation()}})
    finally:
        loaded.gallery.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServiceState(settings=settings, metrics=ServiceMetrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("starting", extra={"fields": {"settings": settings.redacted()}})
        loaded = await run_in_threadpool(load_service, settings, state.metrics)
        state.loaded = loaded
        try:
            if settings.warmup:
                await run_in_threadpool(warm_up, loaded)
            state.ready = True
            size = loaded.gallery.metadata.count()
            log.info("ready", extra={"fields": {"tasks": len(loaded.tasks), "gallery_size": size}})
            yield
        finally:
            state.draining = True
            state.stopped = True
            await run_in_threadpool(shut_down, loaded, settings)
            log.info("stopped")

    app = FastAPI(
        title="modret",
        version="0.1.0",
        summary="Attribute-conditioned image retrieval: search a gallery by similarity under a task",
        lifespan=lifespan,
    )
    app.state.modret = state
    install_error_handlers(app)
    for router in (search.router, tasks.router, images.router, health.router, metrics.router, ui.router):
        app.include_router(router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestTimeoutMiddleware, timeout_s=settings.request_timeout_s)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestLogMiddleware, metrics=state.metrics)
    return app


def configure(settings: Settings) -> None:
    """Process-wide setup done once by the entry point (logging)."""
    configure_logging(settings.log_level)
