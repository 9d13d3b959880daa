"""The admin routes (admin key): ``POST /admin/reload`` serves the run at the settings' ``run_dir`` again,
e.g. a child run from ``modret task add`` that a symlink now names, over the open gallery;
``POST /admin/tasks/{task}/index`` indexes the gallery under a task of the run that it has no index for
yet, in the background while the service serves (``service.runtime.task_indexing``), and
``GET /admin/tasks/{task}/index`` says how far that got. The task is searchable once the job is done.
``DELETE /admin/tasks/{task}/index`` drops a task's index (e.g. one the served run no longer has).

The run is loaded, checked against the gallery's per-task fingerprints and warmed up in a worker thread
while the old state serves on; then the app's state points at the new one (one assignment, so a request
sees either the old model or the new). The old batcher goes on serving the requests that began on it
(a search whose upload was still arriving, a job already queued) and stops once they have ended. A run that
cannot be loaded or cannot serve the gallery (other shared weights, a task embedded differently, another
embedding size) is a 409 ``reload_failed`` naming why, and nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from index.gallery import GalleryError
from model.run import RunError
from service.api.auth import AdminKey
from service.api.deps import LoadedDep, ServiceState, StateDep
from service.api.errors import responses
from service.runtime.errors import NotFound, ReloadFailed
from service.runtime.loaded import Loaded, reload, served_tasks
from service.runtime.queries import resolve_task
from service.runtime.task_indexing import TaskIndexJob
from service.schemas import ModelInfo, ReloadResponse, TaskIndexRemoved, TaskIndexStatus

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
        state.retired.append(current)
        retiring = asyncio.create_task(_retire(state, current))
        state.retiring.add(retiring)
        retiring.add_done_callback(state.retiring.discard)
    log.info("reloaded", extra={"fields": {"tasks": loaded.indexed, "not_indexed": loaded.not_indexed}})
    return ReloadResponse(
        model=ModelInfo(name=loaded.model_name, hash=loaded.run.model_hash),
        tasks=loaded.indexed,
        not_indexed=loaded.not_indexed,
    )


_SETTLE_S = 1.0  # a request resolves the served run a moment before it is admitted on its batcher


async def _retire(state: ServiceState, old: Loaded) -> None:
    """Stop a replaced run's batcher once the requests that began on it have ended: once nothing is
    admitted, queued or in its model (at least ``_SETTLE_S`` after the swap), or after the request
    timeout, past which none of them can still be running."""
    swapped = time.monotonic()
    while True:
        age = time.monotonic() - swapped
        idle = not (old.batcher.admitted_rows or old.batcher.queue_depth() or old.batcher.busy)
        if age >= state.settings.request_timeout_s or (age >= _SETTLE_S and idle):
            break
        await asyncio.sleep(0.05)
    await run_in_threadpool(old.batcher.stop)
    if old in state.retired:
        state.retired.remove(old)


def _time(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _status(job: TaskIndexJob) -> TaskIndexStatus:
    return TaskIndexStatus(
        task=job.task,
        state=job.state,
        total=job.total,
        embedded=job.embedded,
        error=job.error,
        started_at=_time(job.started_at) or "",
        finished_at=_time(job.finished_at),
    )


def _serve_indexed(state: ServiceState) -> None:
    """The job thread's last step: the served state searches every task its gallery now indexes (the
    one the job started with, or the one a reload put in its place over the same gallery)."""
    current = state.loaded
    if current is not None:
        current.indexed = served_tasks(current.gallery, current.run)  # one assignment: old or new list


@router.post(
    "/admin/tasks/{task}/index",
    status_code=202,
    response_model=TaskIndexStatus,
    responses=responses(401, 403, 404, 409, 503, 504),
    summary="Index the gallery under a task of the served run, in the background",
)
async def post_task_index(task: str, state: StateDep, loaded: LoadedDep) -> TaskIndexStatus:
    """Embed the gallery's stored images under ``task`` (a task of the run the gallery has no index for)
    while the service serves; poll ``GET /admin/tasks/{task}/index``. 409 when it is indexed already,
    another task is being indexed, the images were not stored, or the gallery is the replicas' shared one."""
    job = await run_in_threadpool(state.task_indexer.start, loaded, task, lambda _: _serve_indexed(state))
    return _status(job)


@router.get(
    "/admin/tasks/{task}/index",
    response_model=TaskIndexStatus,
    responses=responses(401, 403, 404, 503, 504),
    summary="How far indexing the gallery under a task got",
)
async def get_task_index(task: str, state: StateDep, loaded: LoadedDep) -> TaskIndexStatus:
    name = resolve_task(task, loaded.tasks)
    job = state.task_indexer.status(name)
    if job is None:
        already = (
            "it is indexed already"
            if name in loaded.indexed
            else f"start one: POST /admin/tasks/{name}/index"
        )
        raise NotFound(
            f"no indexing job for {name} since the service started; {already}",
            {"task": name},
            code="no_indexing_job",
        )
    return _status(job)


@router.delete(
    "/admin/tasks/{task}/index",
    response_model=TaskIndexRemoved,
    responses=responses(401, 403, 404, 409, 503, 504, 507),
    summary="Drop the gallery's index of a task",
)
async def delete_task_index(task: str, state: StateDep, loaded: LoadedDep) -> TaskIndexRemoved:
    """Drop ``task``'s index durably while the service serves (writes wait for it): a task the run no
    longer has (uploads are refused until then), or one to index anew. 409 for the gallery's last task,
    while a task is being indexed, or for the replicas' shared gallery."""
    removed = await run_in_threadpool(state.task_indexer.remove, loaded, task)
    await run_in_threadpool(_serve_indexed, state)
    current = state.require()
    return TaskIndexRemoved(task=removed, tasks=current.indexed, not_indexed=current.not_indexed)
