"""The web UI: ``/`` and its two static files, served from a fixed list (no client-given paths)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.api.errors import ApiError

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parents[2] / "static"
FILES = {"app.js": "text/javascript", "style.css": "text/css"}
_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
}


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=_HEADERS)


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    media_type = FILES.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=media_type, headers=_HEADERS)
