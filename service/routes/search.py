"""``POST /search``: gallery images similar to the query under one or several weighted tasks."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from service import search_query
from service.auth import require_reader
from service.errors import responses
from service.request_log import note_task
from service.schemas import SearchResponse
from service.search_query import SearchParams
from service.state import Loaded, ServiceState, get_loaded, get_state
from service.task_specs import parse_filters, parse_tasks
from service.uploads import read_query_image

router = APIRouter(tags=["search"], dependencies=[Depends(require_reader)])

_IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "description": "The query image (omit with ?by_id=)",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "string", "format": "binary"}},
                    "required": ["image"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "string", "description": "base64 image bytes"}},
                    "required": ["image"],
                }
            },
        },
    }
}


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=responses(400, 401, 404, 409, 413, 415, 422, 503, 504),
    openapi_extra=_IMAGE_BODY,
    summary="Search the gallery with an image under one or several weighted tasks",
)
async def search(
    request: Request,
    task: list[str] = Query(
        ..., description="Task, or Task:weight; repeat to combine (negative: unlike the query)"
    ),
    k: int = Query(10, ge=1, le=1000, description="results per page"),
    offset: int = Query(0, ge=0, le=10_000),
    min_score: float | None = Query(None, ge=-1e6, le=1e6, allow_inf_nan=False),
    filters: list[str] = Query([], alias="filter", description="Label:value, repeatable"),
    explain: bool = Query(False, description="each result's similarity under every task"),
    by_id: int | None = Query(None, ge=0, le=2**63 - 1, description="query with this gallery image"),
    loaded: Loaded = Depends(get_loaded),
    state: ServiceState = Depends(get_state),
) -> SearchResponse:
    tasks = parse_tasks(task, loaded.tasks)
    note_task(request, tasks[0].name if len(tasks) == 1 else "combined")
    params = SearchParams(tasks, k, offset, min_score, parse_filters(filters), explain, by_id)
    image = None if by_id is not None else await read_query_image(request, state.settings)
    return await search_query.search(loaded, params, image, state.settings)
