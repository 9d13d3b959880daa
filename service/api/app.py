"""The FastAPI application: ``create_app(settings)``.

The lifespan loads the run and opens the gallery (in a worker thread), starts the batcher, runs a
warm-up pass (one batch through the model and one search per task) and only then reports ready. On
shutdown readiness goes to 503 first, the batcher finishes its queued jobs, and the gallery is saved.

Middleware, outermost first: the one-line startup failure (lifespan only) → request log (request id,
latency metric) → body limit → request timeout → CORS (only when origins are configured) → retry pacing
(``MODRET_PACE_EARLY_RETRIES``) → HEAD as GET → routes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import ServiceState
from service.api.errors import install_error_handlers
from service.api.middleware import (
    BodyLimitMiddleware,
    HeadAsGetMiddleware,
    RequestLogMiddleware,
    RequestTimeoutMiddleware,
    RetryPacingMiddleware,
)
from service.api.routes import admin, docs, health, images, metrics, search, tasks, ui
from service.runtime.loaded import LOAD_ERRORS, load, shut_down, warm_up
from service.runtime.task_indexing import TaskIndexer
from service.settings import Settings
from service.telemetry import ServiceMetrics

log = logging.getLogger("service.app")


class OneLineStartupFailure:
    """Outermost ASGI layer: when the lifespan failed on a run or gallery that cannot be served
    (``ServiceState.startup_error``), the startup-failed message uvicorn logs is that one line instead of
    the traceback Starlette puts in it."""

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_one_line(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and self.state.startup_error is not None:
                message = {**message, "message": f"cannot start: {self.state.startup_error}"}
            await send(message)

        await self.app(scope, receive, send_one_line)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServiceState(
        settings=settings, metrics=ServiceMetrics(), task_indexer=TaskIndexer(settings.model_threads)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("starting", extra={"fields": {"settings": settings.redacted()}})
        try:
            loaded = await run_in_threadpool(load, settings, state.metrics)
        except LOAD_ERRORS as exc:
            state.startup_error = str(exc)  # reported in one line (OneLineStartupFailure, the CLI)
            raise
        state.loaded = loaded
        try:
            if settings.warmup:
                await run_in_threadpool(warm_up, loaded)
            state.ready = True
            size = await run_in_threadpool(loaded.gallery.metadata.count)  # PostgreSQL: a round trip
            log.info("ready", extra={"fields": {"tasks": len(loaded.tasks), "gallery_size": size}})
            yield
        finally:
            state.draining = True
            state.stopped = True
            for retiring in list(state.retiring):
                retiring.cancel()
            for old in state.retired:  # replaced by a reload: only their batchers are theirs alone
                await run_in_threadpool(old.batcher.stop)
            await run_in_threadpool(shut_down, state.loaded or loaded, settings)  # the reloaded one
            log.info("stopped")

    app = FastAPI(
        title="modret",
        version="0.1.0",
        summary="Attribute-conditioned image retrieval: search a gallery by similarity under a task",
        lifespan=lifespan,
        # FastAPI's own pages load their assets from a CDN: ours (routes/docs.py) are served locally.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.modret = state
    install_error_handlers(app)
    routers = (
        search.router,
        tasks.router,
        images.router,
        admin.router,
        health.router,
        metrics.router,
        ui.router,
    )
    for router in routers:
        app.include_router(router)
    docs.mount_docs(app, keyed=settings.api_key is not None and not settings.public_docs)
    app.add_middleware(HeadAsGetMiddleware)
    if settings.pace_early_retries:
        app.add_middleware(RetryPacingMiddleware, max_hold_s=settings.request_timeout_s / 2)
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
    app.add_middleware(OneLineStartupFailure, state=state)
    return app
