"""A gallery item's stored embeddings, for ``?by_id=`` queries (no re-embedding).

The store contract (``index.store.VectorStore``) has no "get vector by id" call yet, so the vector is read
back through search: querying with the D unit vectors e_1…e_D, restricted to the one id, returns the
inner products <e_d, v> = v[d], i.e. the vector itself. Exact for exact (flat) indexes; an approximate
index that cannot find the item under a one-id filter yields 409 rather than a wrong vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from index.gallery import Gallery
from service.errors import ApiError


def stored_vectors(gallery: Gallery, item_id: int, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    if not gallery.items([item_id]):
        raise ApiError(404, "image_not_found", f"no gallery image with id {item_id}", {"id": item_id})
    dim = gallery.embedding_dim
    basis = np.eye(dim, dtype=np.float32)
    allowed = np.array([item_id], dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for task in tasks:
        found = gallery.store.search(task, basis, 1, allowed)
        if not (found.ids[:, 0] == item_id).all():
            raise ApiError(
                409,
                "vector_unavailable",
                f"the index cannot return the stored vector of image {item_id} under {task!r}",
                {"id": item_id, "task": task},
            )
        vector = found.scores[:, 0].astype(np.float32)
        norm = float(np.linalg.norm(vector))
        out[task] = vector / norm if norm > 0 else vector
    return out
