"""``POST /search``: gallery images similar to the query under one or several weighted tasks."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BeforeValidator

from service.api.auth import ReaderKey
from service.api.bodies import read_query_image
from service.api.deps import LoadedDep, StateDep
from service.api.errors import responses
from service.api.middleware import note_task
from service.runtime import search as searching
from service.runtime.queries import parse_filters, parse_tasks, plain_id
from service.runtime.search import SearchParams
from service.schemas import SearchResponse

router = APIRouter(tags=["search"], dependencies=[ReaderKey])

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
                    "properties": {
                        "image": {
                            "type": "string",
                            "description": (
                                "the image bytes in base64 (standard or URL-safe alphabet, padding and "
                                "line breaks optional) or as a data: URL"
                            ),
                        }
                    },
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
    loaded: LoadedDep,
    state: StateDep,
    task: Annotated[
        list[str], Query(description="Task, or Task:weight; repeat to combine (negative: unlike the query)")
    ],
    k: Annotated[int, Query(ge=1, le=1000, description="results per page")] = 10,
    offset: Annotated[int, Query(ge=0, le=10_000)] = 0,
    min_score: Annotated[float | None, Query(ge=-1e6, le=1e6, allow_inf_nan=False)] = None,
    filters: Annotated[
        list[str],
        Query(alias="filter", description="Label:value (Smiling:1, colour:green), repeatable; all must hold"),
    ] = [],  # noqa: B006
    explain: Annotated[bool, Query(description="each result's similarity under every task")] = False,
    by_id: Annotated[
        int | None,
        Query(ge=0, le=2**63 - 1, description="query with this gallery image"),
        BeforeValidator(plain_id),
    ] = None,
) -> Response:
    tasks = parse_tasks(task, loaded.tasks)
    loaded.check_indexed([t.name for t in tasks])
    note_task(request, tasks[0].name if len(tasks) == 1 else "combined")
    params = SearchParams(tasks, k, offset, min_score, parse_filters(filters), explain, by_id)
    with searching.admitted(loaded, params, state.settings):  # overloaded: refused before the body is read
        image = None if by_id is not None else await read_query_image(request, state.settings)
        # The body is encoded in the ranking thread (a SearchResponse); the event loop only sends it.
        body = await searching.search(loaded, params, image, state.settings, state.metrics)
    return Response(body, media_type="application/json")
