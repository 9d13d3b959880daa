"""``POST /images`` below the HTTP edge: decode each upload (hardened), embed under every task, store."""

from __future__ import annotations

from dataclasses import dataclass, field

from anyio.to_thread import run_sync

from index.metadata import NewItem, content_hash
from service.runtime.embedding import decode, embed
from service.runtime.loaded import Loaded
from service.schemas import AddedImage, AddImagesResponse


@dataclass
class Upload:
    """One uploaded file: its client-given name, its bytes, and the labels sent with it."""

    filename: str
    data: bytes
    labels: dict[str, int] = field(default_factory=dict)


async def add_uploads(
    loaded: Loaded, uploads: list[Upload], max_image_pixels: int, retry_after_s: int
) -> AddImagesResponse:
    """Decode (hardened), embed under every task, store, save; answered once the save returned."""
    decoded = [await decode(upload.data, max_image_pixels) for upload in uploads]
    result = await embed(loaded, [d.image for d in decoded], None, retry_after_s)
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
    added = await run_sync(loaded.writer.add, items, result.vectors)
    return AddImagesResponse(
        items=[
            AddedImage(id=a.id, filename=u.filename, duplicate=a.duplicate)
            for a, u in zip(added, uploads, strict=True)
        ],
        index_generation=loaded.writer.generation(),
    )
