"""The gallery: ``POST /images``, ``GET /images``, ``GET /images/{id}``, ``GET /images/{id}/content``,
``DELETE /images/{id}``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from service import gallery_browse
from service.auth import require_admin, require_reader
from service.errors import responses
from service.gallery_uploads import add_uploads
from service.images import MEDIA_TYPES
from service.schemas import AddImagesResponse, Deleted, ImageInfo, ImagePage
from service.state import Loaded, ServiceState, get_loaded, get_state
from service.uploads import read_gallery_uploads

router = APIRouter(tags=["gallery"])

ImageId = Path(ge=0, le=2**63 - 1, description="gallery image id")

_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "labels": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": 'JSON object per image (or one for all), e.g. {"Smiling": 1}',
                        },
                    },
                    "required": ["images"],
                }
            }
        },
    }
}


@router.post(
    "/images",
    status_code=201,
    response_model=AddImagesResponse,
    responses=responses(400, 401, 403, 413, 415, 503, 504),
    openapi_extra=_UPLOAD_BODY,
    dependencies=[Depends(require_admin)],
    summary="Add images to the gallery (embedded under every task; duplicates return the existing id)",
)
async def add_images(
    request: Request, loaded: Loaded = Depends(get_loaded), state: ServiceState = Depends(get_state)
) -> AddImagesResponse:
    uploads = await read_gallery_uploads(request, state.settings)
    return await add_uploads(loaded, uploads, state.settings)


@router.get(
    "/images",
    response_model=ImagePage,
    responses=responses(401, 503, 504),
    dependencies=[Depends(require_reader)],
)
async def list_images(
    offset: int = Query(0, ge=0, le=2**31),
    limit: int = Query(50, ge=1, le=500),
    loaded: Loaded = Depends(get_loaded),
) -> ImagePage:
    return await run_in_threadpool(gallery_browse.page, loaded.gallery, offset, limit)


@router.get(
    "/images/{image_id}",
    response_model=ImageInfo,
    responses=responses(401, 404, 503, 504),
    dependencies=[Depends(require_reader)],
)
async def get_image(image_id: int = ImageId, loaded: Loaded = Depends(get_loaded)) -> ImageInfo:
    record = await run_in_threadpool(gallery_browse.get_record, loaded.gallery, image_id)
    return gallery_browse.image_info(record)


@router.get(
    "/images/{image_id}/content",
    response_class=FileResponse,
    responses={
        200: {"content": {media_type: {} for media_type in MEDIA_TYPES.values()}},
        **responses(401, 404, 503, 504),
    },
    dependencies=[Depends(require_reader)],
)
async def get_image_content(image_id: int = ImageId, loaded: Loaded = Depends(get_loaded)) -> FileResponse:
    path, media_type = await run_in_threadpool(gallery_browse.content, loaded.gallery, image_id)
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"}
    return FileResponse(path, media_type=media_type, headers=headers)


@router.delete(
    "/images/{image_id}",
    response_model=Deleted,
    responses=responses(401, 403, 404, 503, 504),
    dependencies=[Depends(require_admin)],
)
async def delete_image(image_id: int = ImageId, loaded: Loaded = Depends(get_loaded)) -> Deleted:
    removed = await run_in_threadpool(loaded.writer.remove, image_id)
    if not removed:
        raise gallery_browse.not_found(image_id)
    return Deleted(id=image_id, deleted=True)
