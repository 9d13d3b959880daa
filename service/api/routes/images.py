"""The gallery: ``POST /images``, ``GET /images``, ``GET /images/{id}``, ``GET /images/{id}/content``,
``DELETE /images/{id}``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from pydantic import BeforeValidator
from starlette.concurrency import run_in_threadpool

from service.api.auth import AdminKey, ReaderKey
from service.api.bodies import read_gallery_uploads
from service.api.deps import LoadedDep, StateDep
from service.api.errors import responses
from service.runtime import browse
from service.runtime.errors import ImageNotFound
from service.runtime.images import MEDIA_TYPES
from service.runtime.queries import plain_id
from service.runtime.uploads import add_uploads, admitted
from service.schemas import AddImagesResponse, Deleted, ImageInfo, ImagePage

router = APIRouter(tags=["gallery"])

ImageId = Annotated[int, Path(ge=0, le=2**63 - 1, description="gallery image id"), BeforeValidator(plain_id)]

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
                            "description": (
                                "JSON object per image (or one for all): label name to an integer or a "
                                'name, e.g. {"Smiling": 1, "colour": "green"}; a text field or a UTF-8 file '
                                "(curl -F labels=@labels.json)"
                            ),
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
    responses=responses(400, 401, 403, 413, 415, 503, 504, 507),
    openapi_extra=_UPLOAD_BODY,
    dependencies=[AdminKey],
    summary="Add images to the gallery (embedded under every task; duplicates return the existing id)",
)
async def add_images(request: Request, loaded: LoadedDep, state: StateDep) -> AddImagesResponse:
    settings = state.settings
    with admitted(loaded, settings.retry_after_s):  # overloaded: refused before the upload is read
        uploads = await read_gallery_uploads(request, settings)
        return await add_uploads(loaded, uploads, settings.max_image_pixels, settings.retry_after_s)


@router.get(
    "/images",
    response_model=ImagePage,
    responses=responses(401, 503, 504),
    dependencies=[ReaderKey],
)
async def list_images(
    loaded: LoadedDep,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> ImagePage:
    return await run_in_threadpool(browse.page, loaded.gallery, offset, limit)


@router.get(
    "/images/{image_id}",
    response_model=ImageInfo,
    responses=responses(401, 404, 503, 504),
    dependencies=[ReaderKey],
)
async def get_image(image_id: ImageId, loaded: LoadedDep) -> ImageInfo:
    record = await run_in_threadpool(browse.get_record, loaded.gallery, image_id)
    return browse.image_info(record)


@router.get(
    "/images/{image_id}/content",
    response_class=Response,
    responses={
        200: {"content": {media_type: {} for media_type in MEDIA_TYPES.values()}},
        **responses(401, 404, 503, 504),
    },
    dependencies=[ReaderKey],
)
async def get_image_content(image_id: ImageId, loaded: LoadedDep) -> Response:
    data, media_type = await run_in_threadpool(browse.content, loaded.gallery, image_id)
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"}
    return Response(data, media_type=media_type, headers=headers)


@router.delete(
    "/images/{image_id}",
    response_model=Deleted,
    responses=responses(401, 403, 404, 503, 504, 507),
    dependencies=[AdminKey],
)
async def delete_image(image_id: ImageId, loaded: LoadedDep) -> Deleted:
    removed = await run_in_threadpool(loaded.writer.remove, image_id)
    if not removed:
        raise ImageNotFound(image_id)
    return Deleted(id=image_id, deleted=True)
