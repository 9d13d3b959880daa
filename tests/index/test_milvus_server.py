"""The Milvus backend in server mode, against a real Milvus server (``tests.milvus_server``): what several
replicas over one server need (each store sees the others' acknowledged writes at once, from another
process too; two opening a new gallery at once), what a server-mode store keeps on disk, and the refusal
of a generation whose collections are not on the server. The tests that need no server (credentials kept
out of files, an unreachable address) run everywhere pymilvus is installed, and ``Gallery.open``'s store
overrides (what ``MODRET_MILVUS_URI`` becomes) on Milvus Lite files."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from index import milvus_store
from index.gallery import Gallery, GalleryError
from index.generations import GenerationError
from index.metadata import NewItem, content_hash
from index.milvus_store import _safe_uri
from index.store import VectorStore, open_store
from tests.index.conftest import DIM, MODEL_HASH, TASKS, needs_milvus_lite, unit_vectors, vectors_by_task
from tests.milvus_server import MilvusServer, free_ports

needs_pymilvus = pytest.mark.skipif(
    importlib.util.find_spec("pymilvus") is None, reason="pymilvus not installed (modret[cluster])"
)


def server_store(root: Path, server: MilvusServer, prefix: str, **options: object) -> VectorStore:
    return open_store(
        "milvus",
        root,
        tasks=TASKS,
        dim=DIM,
        model_hash=MODEL_HASH,
        options={"uri": server.uri, "collection_prefix": prefix, **options},
    )


@pytest.mark.cluster
def test_two_stores_over_one_server_see_each_others_writes(
    tmp_path: Path, milvus_server: MilvusServer, milvus_prefix: str
) -> None:
    """Two replicas: separate gallery directories, separate clients, one set of collections. An add
    acknowledged by one is found by the other's very next search (self-match at rank 1), a remove too."""
    a = server_store(tmp_path / "a", milvus_server, milvus_prefix)
    b = server_store(tmp_path / "b", milvus_server, milvus_prefix)
    try:
        rng = np.random.default_rng(0)
        ids = np.arange(10, 30, dtype=np.int64)
        by_task = vectors_by_task(rng, len(ids))
        a.add(ids, by_task)
        for task in TASKS:
            assert b.count(task) == len(ids)
            np.testing.assert_array_equal(b.ids(task), ids)
            found = b.search(task, by_task[task], 1)
            np.testing.assert_array_equal(found.ids[:, 0], ids)
            np.testing.assert_allclose(b.get(task, ids[::3]), by_task[task][::3], atol=1e-6)
        assert b.remove(np.array([10, 11, 999])) == 2
        for task in TASKS:
            after = a.search(task, by_task[task][:2], 5)
            assert not np.isin(after.ids, [10, 11]).any()
            assert a.count(task) == len(ids) - 2
        more = vectors_by_task(rng, 1)
        b.add(np.array([500], dtype=np.int64), more)
        assert a.search("Eyeglasses", more["Eyeglasses"], 1).ids[0, 0] == 500
    finally:
        a.close()
        b.close()


CHILD = """
import json, sys
from pathlib import Path
import numpy as np
from index.store import open_store
uri, prefix, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
query = np.array(json.loads(sys.argv[4]), np.float32)
store = open_store("milvus", root, tasks=["Smiling", "Eyeglasses"], dim=len(query), model_hash="0" * 64,
                   options={"uri": uri, "collection_prefix": prefix})
print("found", int(store.search("Smiling", query[None], 1).ids[0, 0]))
vectors = {task: query[None] for task in ("Smiling", "Eyeglasses")}
store.add(np.array([777], dtype=np.int64), vectors)
print("added", flush=True)
store.close()
"""


@pytest.mark.cluster
def test_writes_are_visible_across_processes_at_once(
    tmp_path: Path, milvus_server: MilvusServer, milvus_prefix: str
) -> None:
    """Another process (a replica) finds an add acknowledged here with its first search, and its add
    acknowledged there is found here right after: no flush, no save in between."""
    store = server_store(tmp_path / "here", milvus_server, milvus_prefix)
    try:
        rng = np.random.default_rng(1)
        by_task = vectors_by_task(rng, 5)
        store.add(np.arange(5, dtype=np.int64), by_task)
        query = by_task["Smiling"][3]
        child = subprocess.run(
            [sys.executable, "-c", CHILD, milvus_server.uri, milvus_prefix, str(tmp_path / "there"),
             json.dumps(query.tolist())],
            capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2],
        )  # fmt: skip
        assert child.returncode == 0, child.stderr[-3000:]
        assert child.stdout.split() == ["found", "3", "added"]
        assert store.count("Eyeglasses") == 6
        hits = store.search("Eyeglasses", query[None], 2).ids[0]
        assert 777 in hits.tolist()
    finally:
        store.close()


@pytest.mark.cluster
def test_two_stores_opening_a_new_gallery_at_once(
    tmp_path: Path, milvus_server: MilvusServer, milvus_prefix: str
) -> None:
    """Two replicas that start together over a new prefix both create its collections: one wins each
    race, the other opens what it created; both then serve the same vectors."""
    stores: list[VectorStore] = []
    errors: list[BaseException] = []

    def open_one(name: str) -> None:
        try:
            stores.append(server_store(tmp_path / name, milvus_server, milvus_prefix))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=open_one, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors, errors
        first, second = stores
        vectors = vectors_by_task(np.random.default_rng(2), 3)
        first.add(np.array([1, 2, 3], dtype=np.int64), vectors)
        assert second.search("Smiling", vectors["Smiling"], 1).ids[:, 0].tolist() == [1, 2, 3]
    finally:
        for store in stores:
            store.close()


@pytest.mark.cluster
def test_server_mode_keeps_only_generations_on_disk(
    tmp_path: Path, milvus_server: MilvusServer, milvus_prefix: str
) -> None:
    """No Milvus Lite file; a generation records the server, the collection names and the counts (what
    ``verify`` compares with the metadata), never the token; a reopened store serves the same vectors."""
    root = tmp_path / "store"
    store = server_store(root, milvus_server, milvus_prefix, token="root:Milvus")
    vectors = vectors_by_task(np.random.default_rng(3), 4)
    store.add(np.arange(4, dtype=np.int64), vectors)
    manifest = store.save()
    loaded = store.load()  # the open created the collections, the save counted them: servable now
    assert loaded is not None and loaded.generation == manifest.generation
    store.close()
    assert not list(root.rglob("*.db"))
    assert manifest.counts == {task: 4 for task in TASKS}
    assert "uri" not in manifest.options and "token" not in manifest.options
    record = json.loads((store.generations.directory(manifest) / "collections.json").read_text())
    assert record["uri"] == milvus_server.uri
    assert sorted(record["collections"].values()) == sorted(
        f"{milvus_prefix}_{i:03d}_{task}" for i, task in enumerate(TASKS)
    )
    assert "Milvus" not in "".join(p.read_text() for p in root.rglob("*") if p.is_file())
    reopened = server_store(root, milvus_server, milvus_prefix)
    try:
        assert reopened.manifest is not None and reopened.manifest.generation == manifest.generation
        assert reopened.search("Smiling", vectors["Smiling"], 1).ids[:, 0].tolist() == [0, 1, 2, 3]
    finally:
        reopened.close()


@pytest.mark.cluster
def test_a_generation_whose_collections_are_not_on_the_server_is_refused(
    tmp_path: Path, milvus_server: MilvusServer, milvus_prefix: str
) -> None:
    """Opening a saved gallery against a server that lacks its collections (another server, a dropped
    collection) creates them empty; the generation that counted vectors in them must then not be served,
    or the gallery would roll its metadata back against empty collections."""
    root = tmp_path / "store"
    store = server_store(root, milvus_server, milvus_prefix)
    store.add(np.arange(3, dtype=np.int64), vectors_by_task(np.random.default_rng(4), 3))
    store.save()
    dropped = store.collections["Eyeglasses"]  # type: ignore[attr-defined]
    store.close()
    client = milvus_server.client()
    client.drop_collection(dropped)
    client.close()
    with pytest.raises(GenerationError, match=rf"created empty now\): \{{'{dropped}': 3\}}"):
        server_store(root, milvus_server, milvus_prefix)
    # Another prefix in the same directory names other collections: refused as well.
    with pytest.raises(GenerationError, match="describes collections"):
        server_store(root, milvus_server, f"{milvus_prefix}_other")


@needs_pymilvus
def test_an_unreachable_server_is_a_connection_error(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    unreachable = f"cannot reach the Milvus server at http://127.0.0.1:{port}:"
    with pytest.raises(ConnectionError, match=unreachable) as e:
        open_store(
            "milvus",
            tmp_path,
            tasks=TASKS,
            dim=DIM,
            model_hash=MODEL_HASH,
            options={"uri": f"http://user:secret@127.0.0.1:{port}"},
        )
    assert "secret" not in str(e.value)


def test_credentials_never_reach_files_or_messages() -> None:
    assert _safe_uri("http://root:Milvus@db.internal:19530") == "http://db.internal:19530"
    assert _safe_uri("https://user:pw@host") == "https://host"
    assert _safe_uri("http://host:19530") == "http://host:19530"
    assert _safe_uri("/data/gallery.db") == "/data/gallery.db"


@needs_milvus_lite
def test_store_overrides_replace_the_galleries_options_and_a_wrong_address_is_refused(tmp_path: Path) -> None:
    """``Gallery.open(store_overrides=...)`` (what ``MODRET_MILVUS_URI`` becomes) replaces gallery.json's
    option for a gallery of that backend only, is never written back, and an address without the
    gallery's collections refuses to open instead of rolling the metadata back against empty ones."""
    root = tmp_path / "gallery"
    gallery = Gallery.create(root, tasks=TASKS, dim=DIM, model_hash=MODEL_HASH, backend="milvus")
    rng = np.random.default_rng(5)
    data = [f"image {i}".encode() for i in range(3)]
    items = [NewItem(f"{i}.png", content_hash(d), 4, 4) for i, d in enumerate(data)]
    gallery.insert(items, np.stack([unit_vectors(rng, 3) for _ in TASKS], axis=1))
    gallery.save()
    gallery.close()
    config = (root / "gallery.json").read_bytes()
    elsewhere = {"milvus": {"uri": str(tmp_path / "elsewhere.db")}}
    with pytest.raises(GalleryError, match="created empty now"):
        Gallery.open(root, model_hash=MODEL_HASH, store_overrides=elsewhere)
    assert (root / "gallery.json").read_bytes() == config
    other_backend = {"faiss": {"kind": "hnsw"}, "milvus": {"index_type": "FLAT"}}
    reopened = Gallery.open(root, model_hash=MODEL_HASH, store_overrides=other_backend)
    try:
        assert reopened.metadata.count() == 3  # nothing was rolled back
        assert all(reopened.store.count(task) == 3 for task in TASKS)
    finally:
        reopened.close()


@pytest.mark.cluster
def test_a_collection_left_without_its_index_is_indexed_on_open(
    tmp_path: Path, milvus_server: MilvusServer, milvus_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that crashed between creating a collection and indexing it left one that cannot be
    loaded; the next open waits for the index a moment (another replica may be making it), then makes it."""
    from pymilvus import DataType, MilvusClient

    monkeypatch.setattr(milvus_store, "INDEX_WAIT_S", 0.5)
    client = milvus_server.client()
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    client.create_collection(f"{milvus_prefix}_000_Smiling", schema=schema, consistency_level="Strong")
    client.close()
    store = server_store(tmp_path / "store", milvus_server, milvus_prefix)
    try:
        vectors = vectors_by_task(np.random.default_rng(6), 2)
        store.add(np.array([1, 2], dtype=np.int64), vectors)
        assert store.search("Smiling", vectors["Smiling"], 1).ids[:, 0].tolist() == [1, 2]
    finally:
        store.close()


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("index_type", "index_params", "search_params"),
    [
        ("HNSW", {"M": 16, "efConstruction": 200}, {"ef": 64}),
        ("IVF_FLAT", {"nlist": 16}, {"nprobe": 16}),
        ("DISKANN", {}, {"search_list": 32}),
    ],
)
def test_approximate_milvus_indexes_take_their_parameters(
    tmp_path: Path,
    milvus_server: MilvusServer,
    milvus_prefix: str,
    index_type: str,
    index_params: dict[str, int],
    search_params: dict[str, int],
) -> None:
    """What docs/deploy.md recommends beyond FLAT builds on a server with the parameters given (Milvus
    2.3 refuses HNSW and IVF without them) and finds each vector itself, filters included."""
    options = {"index_type": index_type, "index_params": index_params, "search_params": search_params}
    root = tmp_path / "store"
    store = server_store(root, milvus_server, milvus_prefix, **options)
    try:
        vectors = vectors_by_task(np.random.default_rng(7), 200)
        store.add(np.arange(200, dtype=np.int64), vectors)
        found = store.search("Smiling", vectors["Smiling"], 1).ids[:, 0]
        assert (found == np.arange(200)).mean() >= 0.95
        allowed = np.arange(0, 200, 7)
        hits = store.search("Eyeglasses", vectors["Eyeglasses"][:5], 5, allowed).ids
        assert np.isin(hits[hits >= 0], allowed).all()
        manifest = store.save()
        assert {k: manifest.options.get(k, {}) for k in options} == options  # {}: not recorded
    finally:
        store.close()
