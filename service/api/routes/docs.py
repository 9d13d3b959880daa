"""The API's own documentation behind the API key: ``/openapi.json``, ``/docs`` and ``/redoc``.

Mounted instead of FastAPI's open ones when an API key is set and ``public_docs`` is off (the default),
so that every route but health and the UI files needs the key, as docs/deploy.md says.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from service.api.auth import ReaderKey

router = APIRouter(include_in_schema=False, dependencies=[ReaderKey])


@router.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - docs")


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} - ReDoc")
