"""``GET /v2/health/live`` and ``GET /v2/health/ready`` (KServe-style paths; never behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.api.deps import ServiceState, StateDep
from service.api.errors import responses
from service.schemas import Liveness, ModelInfo, Readiness

router = APIRouter(tags=["health"])


@router.get("/v2/health/live", response_model=Liveness, responses=responses(504))
async def live() -> Liveness:
    return Liveness(status="live")


def readiness(state: ServiceState) -> Readiness:
    loaded = state.require_ready()
    return Readiness(
        status="ready",
        model=ModelInfo(name=loaded.model_name, hash=loaded.run.model_hash),
        tasks=len(loaded.tasks),
        gallery_size=loaded.gallery.metadata.count(),
        index_generation=loaded.writer.generation(),
    )


@router.get("/v2/health/ready", response_model=Readiness, responses=responses(503, 504))
async def ready(state: StateDep) -> Readiness:
    state.require_ready()  # 503 at once while loading or draining, without a thread hop
    return await run_in_threadpool(readiness, state)
