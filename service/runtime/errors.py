"""The runtime's domain errors: what went wrong with a request, in words, without any HTTP.

Each error carries a stable machine ``code`` (``unknown_task``, ``image_too_large``…), a message that says
what was wrong and how to fix it, and optional ``details``. The API edge (``service.api.errors``) maps each
class to one HTTP status; nothing below it knows about status codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ServiceError(Exception):
    """Base of every domain error the service answers with a JSON error body."""

    code = "error"

    def __init__(
        self,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.retry_after_s = retry_after_s
        if code is not None:
            self.code = code


class InvalidQuery(ServiceError):
    """Well-formed request, invalid parameters (a zero weight, a bad filter, an unknown label)."""

    code = "invalid_parameters"


class UnknownTask(ServiceError):
    """A task name the model does not serve; the details list the valid ones."""

    code = "unknown_task"

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(
            f"unknown task {name!r}; valid tasks: {', '.join(known)}",
            {"task": name, "valid_tasks": list(known)},
        )


class NotFound(ServiceError):
    """A gallery image (or its stored bytes) that does not exist."""

    code = "not_found"


class ImageNotFound(NotFound):
    code = "image_not_found"

    def __init__(self, item_id: int) -> None:
        super().__init__(f"no gallery image with id {item_id}", {"id": item_id})


class VectorUnavailable(ServiceError):
    """The item exists but the index holds no vector of it under a task (removed meanwhile)."""

    code = "vector_unavailable"


class Conflict(ServiceError):
    """The request is valid but the model and gallery as they stand cannot answer it."""

    code = "conflict"


class TaskNotIndexed(Conflict):
    """A task the model serves but the gallery has no index for (added to the run after the gallery)."""

    code = "task_not_indexed"

    def __init__(self, name: str, indexed: Sequence[str]) -> None:
        super().__init__(
            f"task {name!r} is in the model but the gallery has no index for it yet: index it with "
            f"`POST /admin/tasks/{name}/index` (admin key), or stop the service, run `modret index add-task "
            f"--run RUN --index INDEX_DIR --task {name}` and start it again; searchable now: "
            f"{', '.join(indexed)}",
            {"task": name, "indexed_tasks": list(indexed)},
        )


class GalleryOutOfDate(Conflict):
    """The gallery indexes a task the model no longer has, so new images cannot be embedded for it."""

    code = "gallery_out_of_date"

    def __init__(self, dropped: Sequence[str]) -> None:
        names = ", ".join(dropped)
        super().__init__(
            f"the gallery indexes {names}, which the model no longer has, so it cannot add images: drop "
            f"the index (`DELETE /admin/tasks/{dropped[0]}/index` with the admin key, or `modret index "
            f"remove-task --index INDEX_DIR --task {dropped[0]}` with the service stopped) or serve a run "
            "that has it; searches go on",
            {"tasks": list(dropped)},
        )


class ReloadFailed(Conflict):
    """``POST /admin/reload`` could not load the run, or serve the gallery with it; the old one serves on."""

    code = "reload_failed"


class ImageRejected(ServiceError):
    """Image bytes that cannot be decoded: empty, truncated or corrupt."""

    code = "corrupt_image"


class ImageTooLarge(ImageRejected):
    """Too many pixels, a decompression bomb, or more memory than a decode may take."""

    code = "image_too_large"


class UnsupportedImage(ImageRejected):
    """Bytes of a type outside the allowlist (JPEG, PNG, WebP, GIF, BMP)."""

    code = "unsupported_media_type"


class Unavailable(ServiceError):
    """The service cannot take this request now (loading, shutting down); retry after ``retry_after_s``."""

    code = "unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s)


class InsufficientStorage(ServiceError):
    """The gallery's disk (or quota) had no room for a write: nothing was applied; once space is freed
    the same request succeeds (an add of the same image then returns its id either way)."""

    code = "insufficient_storage"

    def __init__(self, message: str, *, retry_after_s: int = 30) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class Overloaded(Unavailable):
    """The model's queue is full or its worker is stopping."""

    code = "overloaded"
