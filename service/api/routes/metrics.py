"""``GET /metrics``: Prometheus text format (behind the API key when one is set)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from service.api.auth import ReaderKey
from service.api.deps import ServiceState, StateDep
from service.api.errors import responses

router = APIRouter(tags=["metrics"], dependencies=[ReaderKey])


def render(state: ServiceState) -> bytes:
    loaded = state.loaded
    if loaded is not None:
        for task in loaded.indexed:
            state.metrics.gallery_size.labels(task).set(loaded.gallery.store.count(task))
        state.metrics.queue_depth.set(loaded.batcher.queue_depth())
    return state.metrics.render()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, **responses(401, 504)},
)
async def metrics(state: StateDep) -> Response:
    body = await run_in_threadpool(render, state)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
