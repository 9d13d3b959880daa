"""``GET /tasks`` and ``GET /tasks/{task}``: what the model can search by (a task of the run that the
gallery has no index for yet is listed with ``indexed: false``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from service.api.auth import ReaderKey
from service.api.deps import LoadedDep
from service.api.errors import responses
from service.api.middleware import note_task
from service.runtime.loaded import Loaded
from service.runtime.queries import resolve_task
from service.schemas import ModelInfo, TaskInfo, TaskList

router = APIRouter(tags=["tasks"], dependencies=[ReaderKey])


def describe_task(name: str) -> str:
    words = name.replace("_", " ").lower()
    return f"images whose '{words}' attribute resembles the query's"


def task_info(loaded: Loaded, name: str) -> TaskInfo:
    metrics = loaded.task_metrics.get(name)
    indexed = name in loaded.indexed
    return TaskInfo(
        name=name,
        index=loaded.tasks.index(name),
        description=describe_task(name),
        gallery_size=loaded.gallery.store.count(name) if indexed else 0,
        indexed=indexed,
        accuracy=metrics.get("triplet_accuracy") if metrics else None,
        leakage=metrics.get("leakage") if metrics else None,
        metrics=metrics,
    )


def list_tasks(loaded: Loaded) -> TaskList:
    return TaskList(
        tasks=[task_info(loaded, name) for name in loaded.tasks],
        model=ModelInfo(name=loaded.model_name, hash=loaded.run.model_hash),
    )


@router.get("/tasks", response_model=TaskList, responses=responses(401, 503, 504))
async def get_tasks(loaded: LoadedDep) -> TaskList:
    return await run_in_threadpool(list_tasks, loaded)


@router.get("/tasks/{task}", response_model=TaskInfo, responses=responses(401, 404, 503, 504))
async def get_task(task: str, request: Request, loaded: LoadedDep) -> TaskInfo:
    name = resolve_task(task, loaded.tasks)
    note_task(request, name)
    return await run_in_threadpool(task_info, loaded, name)
