"""An engine that fails under a running service (the vector store's Milvus) is a retryable 503 with the
JSON error, never a 500; the service itself stays up."""

from __future__ import annotations

from pathlib import Path

import pytest

from index.gallery import Gallery
from model.run import load_run
from tests.factories import face
from tests.service.api.server import error_of, running_server, settings_for
from tests.service.api.test_request_path import loaded_of


@pytest.fixture
def milvus_index(run_dir: Path, tmp_path: Path) -> Path:
    pytest.importorskip("milvus_lite", reason="needs the milvus extra (pip install 'modret[milvus]')")
    run = load_run(run_dir)
    gallery = Gallery.create(
        tmp_path / "index", tasks=run.task_names, dim=run.embedding_dim, model_hash=run.model_hash,
        backend="milvus", fingerprints=run.fingerprints,
    )  # fmt: skip
    gallery.close()
    return tmp_path / "index"


def test_a_vector_store_failure_is_a_retryable_503(run_dir: Path, milvus_index: Path) -> None:
    image = face(3)[0]
    with running_server(settings_for(run_dir, milvus_index)) as server, server.client() as client:
        added = client.post("/images", files=[("images", ("a.png", image, "image/png"))])
        assert added.status_code == 201, added.text
        params = {"task": "Smiling", "k": 3}
        assert client.post(
            "/search", params=params, files={"image": ("q.png", image, "image/png")}
        ).is_success
        store = loaded_of(server).gallery.store
        store._client._client.drop_collection(store.collections["Smiling"])  # type: ignore[attr-defined]
        response = client.post("/search", params=params, files={"image": ("q.png", image, "image/png")})
        assert response.status_code == 503, response.text
        error = error_of(response)
        assert error["error"] == "vector_store_unavailable" and response.headers["retry-after"] == "5"
        assert error["message"].startswith("the gallery's vector store is unavailable: Milvus at")
        assert client.get("/v2/health/live").status_code == 200  # the service is up
