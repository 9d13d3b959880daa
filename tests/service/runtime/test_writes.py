"""Gallery writes from the service: a gallery that cannot take writes is a clean 503, never a 500."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.gallery import Gallery
from index.metadata import NewItem
from service.api.errors import status_of
from service.runtime.errors import Unavailable
from service.runtime.writes import GalleryWriter


def test_a_gallery_that_refuses_writes_is_unavailable(index_dir: Path) -> None:
    gallery = Gallery.open(index_dir, read_only=True)  # what a committer that stopped looks like: refusals
    try:
        writer = GalleryWriter(gallery)
        with pytest.raises(Unavailable) as removed:
            writer.remove(1)
        assert removed.value.code == "gallery_unavailable" and status_of(removed.value) == 503
        item = NewItem(source="x.png", content_hash="0" * 64, width=1, height=1, labels={}, data=b"x")
        vectors = np.zeros((1, len(gallery.tasks), gallery.embedding_dim), dtype=np.float32)
        with pytest.raises(Unavailable):
            writer.add([item], vectors)
    finally:
        gallery.close()
