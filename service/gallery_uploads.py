"""Adding uploaded images to the gallery: decode (hardened), embed under every task, store, save."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from index.metadata import NewItem, content_hash
from service.embedding import decode, embed
from service.schemas import AddedImage, AddImagesResponse
from service.settings import Settings
from service.state import Loaded
from service.uploads import Upload


async def add_uploads(loaded: Loaded, uploads: list[Upload], settings: Settings) -> AddImagesResponse:
    decoded = [await decode(upload.data, settings.max_image_pixels) for upload in uploads]
    result = await embed(loaded, [d.image for d in decoded], None, settings.retry_after_s)
    items = [
        NewItem(
            source=upload.filename,
            content_hash=content_hash(upload.data),
            width=image.width,
            height=image.height,
            labels=upload.labels,
            data=upload.data,
        )
        for upload, image in zip(uploads, decoded, strict=True)
    ]
    added = await run_in_threadpool(loaded.writer.add, items, result.vectors)
    return AddImagesResponse(
        items=[
            AddedImage(id=a.id, filename=u.filename, duplicate=a.duplicate)
            for a, u in zip(added, uploads, strict=True)
        ],
        index_generation=loaded.writer.generation(),
    )
