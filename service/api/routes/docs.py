"""The API's own documentation: ``/openapi.json``, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc).

FastAPI's built-in pages load Swagger UI and ReDoc from a CDN, so offline (the service's default: nothing
is downloaded at run time) ``/docs`` is blank. These pages load the same assets from the installed
``fastapi-offline`` package instead (Swagger UI 5, ReDoc 2, their favicon), served under ``/static/docs``
by ``mount_docs``; ReDoc is told not to fetch Google Fonts. Both pages carry a Content-Security-Policy
that allows nothing but this origin, so that nothing they (or a later asset version) reference elsewhere
is fetched: ReDoc's "powered by" logo from its CDN, say, is simply not shown.

With an API key set and ``public_docs`` off (the default) the three routes need the reader key, so that
every route but health and the UI's own files needs the key, as docs/deploy.md says; the assets are
public, like the web UI's files.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from service.api.auth import ReaderKey

ASSETS_URL = "/static/docs"
ASSETS = Path(str(files("fastapi_offline") / "static"))  # swagger-ui-bundle.js, swagger-ui.css, ...
# The pages' inline start-up script and inline styles are the generators' own; ReDoc's search runs in a
# worker made from a blob.
_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'"
    ),
}


def docs_router(keyed: bool) -> APIRouter:
    """The three documentation routes; behind the reader key when ``keyed``."""
    router = APIRouter(include_in_schema=False, dependencies=[ReaderKey] if keyed else [])

    @router.get("/openapi.json")
    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    @router.get("/docs")
    async def swagger(request: Request) -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{request.app.title} - docs",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        )
        page.headers.update(_HEADERS)
        return page

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        page = get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{request.app.title} - ReDoc",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
        page.headers.update(_HEADERS)
        return page

    return router


def mount_docs(app: FastAPI, keyed: bool) -> None:
    """Serve the documentation on ``app`` from local assets (create the app with FastAPI's own docs,
    ReDoc and OpenAPI routes turned off)."""
    app.include_router(docs_router(keyed))
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")
