"""The service's gallery on a Milvus server through its settings (``MODRET_MILVUS_*``): ``CREATE_INDEX``
creates a milvus gallery on the configured server, and a later start reaches it by another address
through the override, gallery.json unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from index.metadata import NewItem, content_hash
from model.run import load_run
from service.runtime.loaded import open_gallery
from service.settings import Settings
from tests.milvus_server import MilvusServer


@pytest.mark.cluster
def test_the_service_creates_and_reopens_a_gallery_on_the_configured_server(
    run_dir: Path, tmp_path: Path, milvus_server: MilvusServer, milvus_prefix: str
) -> None:
    run = load_run(run_dir)
    index_dir = tmp_path / "index"
    settings = Settings(  # type: ignore[call-arg]
        index_dir=index_dir,
        create_index=True,
        milvus_uri=milvus_server.uri,
        milvus_collection_prefix=milvus_prefix,
        _env_file=None,
    )
    gallery = open_gallery(settings, run)
    try:
        assert gallery.config["backend"] == "milvus"
        recorded = {"uri": milvus_server.uri, "collection_prefix": milvus_prefix}
        assert gallery.config["store_options"] == recorded
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((1, len(run.task_names), run.embedding_dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
        gallery.insert([NewItem("a.png", content_hash(b"a"), 4, 4)], vectors)
    finally:
        gallery.close()
    config = (index_dir / "gallery.json").read_text()
    assert not list(index_dir.rglob("*.db"))

    elsewhere = f"http://localhost:{milvus_server.port}"  # the same server by another name
    later = Settings(index_dir=index_dir, milvus_uri=elsewhere, _env_file=None)  # type: ignore[call-arg]
    gallery = open_gallery(later, run)
    try:
        assert gallery.store.uri == elsewhere  # type: ignore[attr-defined]
        assert gallery.metadata.count() == 1
        task = run.task_names[0]
        assert gallery.store.search(task, vectors[:, 0], 1).ids[0, 0] == gallery.metadata.ids()[0]
    finally:
        gallery.close()
    assert (index_dir / "gallery.json").read_text() == config
    assert json.loads(config)["store_options"]["uri"] == milvus_server.uri
