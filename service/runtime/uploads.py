"""``POST /images`` below the HTTP edge: decode each upload (hardened), embed under every task, store."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from anyio.to_thread import run_sync

from index.metadata import NewItem, content_hash
from model.data.base import LabelValue
from service.runtime import embedding
from service.runtime.embedding import check_room, embed, prepare
from service.runtime.loaded import Loaded
from service.schemas import AddedImage, AddImagesResponse


@dataclass
class Upload:
    """One uploaded file: its client-given name, its bytes, and the labels sent with it."""

    filename: str
    data: bytes
    labels: dict[str, LabelValue] = field(default_factory=dict)


def admitted(loaded: Loaded, retry_after_s: int) -> AbstractContextManager[None]:
    """An upload request counted against the model's bound while the block runs, as one image under every
    task (its count is known once the body is read), or ``Overloaded`` on entry (``embedding.admitted``)."""
    return embedding.admitted(loaded, 1, None, retry_after_s)


async def add_uploads(
    loaded: Loaded, uploads: list[Upload], max_image_pixels: int, retry_after_s: int
) -> AddImagesResponse:
    """Decode (hardened), embed under every task, store: answered once the one log record holding every
    upload of the request is durable."""
    data = [upload.data for upload in uploads]
    check_room(loaded, len(data), None, retry_after_s)  # overloaded since the body came: not decoded
    prepared = await run_sync(prepare, data, max_image_pixels, loaded.decode_budget, loaded.run.preprocess)
    result = await embed(loaded, prepared.pixels, None, retry_after_s)
    items = [
        NewItem(
            source=upload.filename,
            content_hash=content_hash(upload.data),
            width=width,
            height=height,
            labels=upload.labels,
            data=upload.data,
        )
        for upload, (width, height) in zip(uploads, prepared.sizes, strict=True)
    ]
    added = await run_sync(loaded.writer.add, items, result.vectors, loaded.tasks)
    return AddImagesResponse(
        items=[
            AddedImage(id=a.id, filename=u.filename, duplicate=a.duplicate)
            for a, u in zip(added, uploads, strict=True)
        ],
        index_generation=loaded.writer.generation(),
    )
