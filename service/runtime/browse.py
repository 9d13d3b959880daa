"""Reading the gallery for the image routes (blocking: called in a worker thread)."""

from __future__ import annotations

from index.metadata import ItemRecord
from index.served import ServedGallery
from service.runtime.errors import ImageNotFound, NotFound
from service.runtime.images import MEDIA_TYPES, sniff_format
from service.schemas import ImageInfo, ImagePage


def image_info(record: ItemRecord) -> ImageInfo:
    return ImageInfo(
        id=record.id,
        source=record.source,
        width=record.width,
        height=record.height,
        labels=record.labels,
        added_at=record.added_at,
        image_url=f"/images/{record.id}/content" if record.has_blob else None,
    )


def get_record(gallery: ServedGallery, item_id: int) -> ItemRecord:
    record = gallery.items([item_id]).get(item_id)
    if record is None:
        raise ImageNotFound(item_id)
    return record


def page(gallery: ServedGallery, offset: int, limit: int) -> ImagePage:
    ids = gallery.metadata.ids()
    chosen = ids[offset : offset + limit]
    records = gallery.items(chosen)
    items = [image_info(records[int(i)]) for i in chosen if int(i) in records]
    return ImagePage(total=len(ids), offset=offset, limit=limit, items=items)


def content(gallery: ServedGallery, item_id: int) -> tuple[bytes, str]:
    """The stored bytes of an item's image (located by its content hash, never by a client path: a blob
    file, or PostgreSQL's bytea for a shared gallery) and their media type."""
    record = get_record(gallery, item_id)
    data = gallery.image_bytes(record)
    if data is None:
        message = (
            f"the stored bytes of image {item_id} are missing from the gallery (`modret index verify` "
            "lists what is lost)"
            if record.has_blob
            else f"image {item_id} was indexed from {record.source!r} without keeping its bytes"
        )
        raise NotFound(message, {"id": item_id}, code="no_image_content")
    fmt = sniff_format(data[:16])
    return data, MEDIA_TYPES.get(fmt or "", "application/octet-stream")
