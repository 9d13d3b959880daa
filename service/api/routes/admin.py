"""``POST /admin/reload`` (admin key): serve the run at the settings' ``run_dir`` again, e.g. a child run
from ``modret task add`` that a symlink now names, over the open gallery.

The run is loaded, checked against the gallery's per-task fingerprints and warmed up in a worker thread
while the old state serves on; then the app's state points at the new one (one assignment, so a request
sees either the old model or the new) and the old batcher finishes its queued jobs and stops. A run that
cannot be loaded or cannot serve the gallery (other shared weights, a task embedded differently, another
embedding size) is a 409 ``reload_failed`` naming why, and nothing changes.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from index.gallery import GalleryError
from model.run import RunError
from service.api.auth import AdminKey
from service.api.deps import StateDep
from service.api.errors import responses
from service.runtime.errors import ReloadFailed
from service.runtime.loaded import reload
from service.schemas import ModelInfo, ReloadResponse

log = logging.getLogger("service.admin")

router = APIRouter(tags=["admin"], dependencies=[AdminKey])


@router.post("/admin/reload", response_model=ReloadResponse, responses=responses(401, 403, 409, 503, 504))
async def post_reload(state: StateDep) -> ReloadResponse:
    """Load the run again from the settings and serve it over the open gallery."""
    async with state.reloading:
        current = state.require()
        try:
            loaded = await run_in_threadpool(reload, current, state.settings, state.metrics)
        except (GalleryError, RunError, OSError, ValueError) as e:
            log.error("reload refused", extra={"fields": {"reason": str(e)}})
            raise ReloadFailed(f"reload refused, still serving {current.model_name}: {e}") from e
        state.loaded = loaded
        await run_in_threadpool(current.batcher.stop)
    log.info("reloaded", extra={"fields": {"tasks": loaded.indexed, "not_indexed": loaded.not_indexed}})
    return ReloadResponse(
        model=ModelInfo(name=loaded.model_name, hash=loaded.run.model_hash),
        tasks=loaded.indexed,
        not_indexed=loaded.not_indexed,
    )
