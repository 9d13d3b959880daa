"""A gallery item's stored embeddings, for ``?by_id=`` queries (no re-embedding).

The vectors come straight from the store (``Gallery.vectors``): exact copies for exact indexes, the decoded
approximation for an IVF-PQ index (re-normalised here, as queries always are). An item that has metadata
but no vector under a task (removed meanwhile, or a store that a crash left behind) is 409.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from index.gallery import Gallery
from index.store import UnknownIdError
from service.errors import ApiError


def stored_vectors(gallery: Gallery, item_id: int, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    if not gallery.items([item_id]):
        raise ApiError(404, "image_not_found", f"no gallery image with id {item_id}", {"id": item_id})
    out: dict[str, np.ndarray] = {}
    for task in tasks:
        try:
            vector = gallery.vectors([item_id], task)[0]
        except UnknownIdError:
            raise ApiError(
                409,
                "vector_unavailable",
                f"the index holds no stored vector of image {item_id} under {task!r}",
                {"id": item_id, "task": task},
            ) from None
        norm = float(np.linalg.norm(vector))
        out[task] = vector / norm if norm > 0 else vector
    return out
