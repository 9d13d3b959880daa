"""The Gallery facade: metadata (ids, dedupe, labels, blobs), label filters, model binding, crash repair,
single-writer locking, verify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.gallery import STORE_DIR, Gallery, GalleryError
from index.metadata import NewItem, UnknownLabelError, content_hash
from index.store import UnknownIdError
from tests.factories import stored_blob
from tests.index.conftest import (
    BACKEND_CASES,
    DIM,
    MODEL_HASH,
    TASKS,
    BackendCase,
    end_process_state,
    needs_milvus_lite,
    unit_vectors,
)


def item(n: int, male: int, upload: bool = False) -> NewItem:
    data = f"image bytes {n}".encode()
    return NewItem(
        source=f"img{n}.jpg",
        content_hash=content_hash(data),
        width=30 + n,
        height=20,
        labels={"Male": male, "Smiling": n % 2},
        data=data if upload else None,
    )


def vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([unit_vectors(rng, n) for _ in TASKS], axis=1)


def create(root: Path, backend: str = "faiss") -> Gallery:
    return Gallery.create(root, tasks=TASKS, dim=DIM, model_hash=MODEL_HASH, backend=backend)


def test_ids_dedupe_labels_and_blobs(tmp_path: Path) -> None:
    gallery = create(tmp_path)
    ids = gallery.add([item(i, male=i % 3 == 0, upload=i < 2) for i in range(6)], vectors(6))
    assert ids == [1, 2, 3, 4, 5, 6]
    # The same content again (also twice within one batch) returns the existing id, stored once.
    again = gallery.add([item(2, 0), item(9, 1), item(9, 1)], vectors(3, seed=1))
    assert again == [3, 7, 7]
    assert gallery.store.count("Smiling") == 7 and gallery.metadata.count() == 7
    record = gallery.items([1])[1]
    assert (record.source, record.width, record.height) == ("img0.jpg", 30, 20)
    assert record.labels == {"Male": 1, "Smiling": 0} and record.added_at.endswith("+00:00")
    blob = stored_blob(gallery, record)
    assert blob is not None and blob.read_bytes() == b"image bytes 0" and blob.name == record.content_hash
    assert stored_blob(gallery, gallery.items([4])[4]) is None
    # Removed ids are never handed out again.
    assert gallery.remove([7]) == 1
    assert gallery.add([item(20, 0)], vectors(1, seed=2)) == [8]
    gallery.close()


def test_label_filter(tmp_path: Path) -> None:
    gallery = create(tmp_path)
    ids = np.array(gallery.add([item(i, male=int(i % 3 == 0)) for i in range(12)], vectors(12)))
    queries = unit_vectors(np.random.default_rng(5), 2)
    males = set(ids[np.arange(12) % 3 == 0].tolist())
    result = gallery.search("Smiling", queries, 10, {"Male": 1})
    assert set(result.ids[result.ids >= 0].tolist()) == males
    both = gallery.search("Smiling", queries, 10, {"Male": 1, "Smiling": 1})
    assert set(both.ids[both.ids >= 0].tolist()) == {i for i in males if (i - 1) % 2 == 1}
    with pytest.raises(
        UnknownLabelError, match="no gallery item has a label 'Bald'; known labels: Male, Smiling"
    ):
        gallery.search("Smiling", queries, 3, {"Bald": 1})
    gallery.close()


def test_model_binding_and_single_writer(tmp_path: Path) -> None:
    create(tmp_path).close()
    with pytest.raises(GalleryError, match="already holds a gallery"):
        create(tmp_path)
    with pytest.raises(GalleryError, match="rebuild the index with this run"):
        Gallery.open(tmp_path, model_hash="e" * 64)
    writer = Gallery.open(tmp_path, model_hash=MODEL_HASH)
    with pytest.raises(GalleryError, match="open for writing in another process"):
        Gallery.open(tmp_path)
    reader = Gallery.open(tmp_path, read_only=True)
    with pytest.raises(GalleryError, match="read-only"):
        reader.add([item(1, 0)], vectors(1))
    reader.close()
    writer.close()
    with pytest.raises(GalleryError, match="holds no gallery"):
        Gallery.open(tmp_path / "nothing")


def test_writes_are_durable_without_a_save(tmp_path: Path) -> None:
    gallery = create(tmp_path)
    gallery.add([item(i, 0) for i in range(5)], vectors(5))
    gallery.save()
    gallery.add([item(i, 0) for i in range(5, 8)], vectors(3, seed=1))  # in the log only
    assert gallery.remove([2]) == 1  # in the log only
    gallery.close(snapshot=False)  # as good as a crash: no snapshot since

    reopened = Gallery.open(tmp_path, model_hash=MODEL_HASH)
    assert reopened.repairs == []
    assert reopened.metadata.ids().tolist() == [1, 3, 4, 5, 6, 7, 8]
    assert reopened.store.ids("Eyeglasses").tolist() == [1, 3, 4, 5, 6, 7, 8]
    np.testing.assert_allclose(reopened.vectors([6, 7, 8], "Eyeglasses"), vectors(3, seed=1)[:, 1], atol=1e-6)
    assert reopened.verify(MODEL_HASH).ok
    assert reopened.info().log_records == 2  # one add record, one remove record after the snapshot
    reopened.save()
    info = reopened.info()
    assert info.counts == {"Smiling": 7, "Eyeglasses": 7} and info.items == 7 and info.generation == 2
    assert info.log_records == 0
    reopened.close()


def test_verify_reports_problems(tmp_path: Path) -> None:
    gallery = create(tmp_path)
    gallery.add([item(i, 0, upload=True) for i in range(4)], vectors(4))
    gallery.save()
    gallery.add([item(9, 0)], vectors(1, seed=3))
    gallery.save()
    report = gallery.verify(MODEL_HASH)
    assert report.ok, report.problems
    gallery.close()

    newest = sorted((tmp_path / "store").glob("gen-*/task-001.faiss"))[-1]
    newest.write_bytes(newest.read_bytes()[:-8])
    blob = gallery.metadata.blob_path(item(0, 0).content_hash)
    blob.unlink()
    reader = Gallery.open(tmp_path, read_only=True)
    report = reader.verify("d" * 64)
    text = "\n".join(report.problems)
    assert "refused generation: manifest-00000002.json" in text and "truncated" in text
    assert "model mismatch" in text
    # The fall-back to generation 1 replays the log after it: the item added later is not lost.
    assert "ids missing" not in text and 5 in reader.store.ids("Smiling").tolist()
    assert "blob" in text and "missing" in text
    reader.close()


@needs_milvus_lite
def test_milvus_gallery(tmp_path: Path) -> None:
    gallery = create(tmp_path, backend="milvus")
    ids = gallery.add([item(i, male=i % 2) for i in range(6)], vectors(6))
    gallery.save()
    gallery.close()
    reopened = Gallery.open(tmp_path, model_hash=MODEL_HASH)
    assert (tmp_path / "store" / "gallery.db").exists()
    result = reopened.search("Eyeglasses", unit_vectors(np.random.default_rng(1), 1), 6, {"Male": 1})
    assert set(result.ids[result.ids >= 0].tolist()) == {ids[i] for i in range(6) if i % 2}
    assert reopened.verify(MODEL_HASH).ok
    reopened.close()


def test_a_blob_given_for_known_content_is_kept(tmp_path: Path) -> None:
    gallery = create(tmp_path)
    [first] = gallery.add([item(1, 0)], vectors(1))  # built without its bytes
    assert stored_blob(gallery, gallery.items([first])[first]) is None
    assert gallery.add([item(1, 0, upload=True)], vectors(1, seed=1)) == [first]  # the same image, uploaded
    blob = stored_blob(gallery, gallery.items([first])[first])
    assert blob is not None and blob.read_bytes() == b"image bytes 1"
    gallery.close()


@pytest.mark.parametrize("case", BACKEND_CASES, ids=[c.name for c in BACKEND_CASES])
def test_reopened_in_a_fresh_process(case: BackendCase, tmp_path: Path) -> None:
    """A gallery built, saved and closed, then opened by a new process (a restarted service; ``modret
    index verify`` beside it): search, stored vectors and verify work, read-only and for writing."""
    gallery = Gallery.create(
        tmp_path,
        tasks=TASKS,
        dim=DIM,
        model_hash=MODEL_HASH,
        backend=case.backend,
        store_options=case.options,
    )
    added = vectors(20)  # IVF-PQ trains on its first add: at least 16 vectors
    ids = gallery.add([item(i, male=i % 2, upload=i < 3) for i in range(20)], added)
    gallery.remove([ids[5]])
    gallery.save()
    gallery.close()
    kept = [i for i in range(20) if i != 5]
    for read_only in (True, False):
        end_process_state(str(tmp_path / STORE_DIR / "gallery.db"))  # Milvus Lite's file in the gallery
        reopened = Gallery.open(tmp_path, model_hash=MODEL_HASH, read_only=read_only)
        assert reopened.repairs == []
        report = reopened.verify(MODEL_HASH)
        assert report.ok, report.problems
        for t, task in enumerate(TASKS):
            result = reopened.search(task, added[kept, t], 1)
            if case.exact:
                assert result.ids[:, 0].tolist() == [ids[i] for i in kept]
            else:
                assert set(result.ids[:, 0].tolist()) <= {ids[i] for i in kept}
            stored = reopened.vectors([ids[i] for i in kept], task)
            assert stored.shape == (len(kept), DIM)
            if case.exact:
                np.testing.assert_allclose(stored, added[kept, t], atol=1e-6)
        with pytest.raises(UnknownIdError, match=rf"not stored under task 'Smiling': {ids[5]}"):
            reopened.vectors([ids[5]], "Smiling")
        males = reopened.search("Eyeglasses", added[:1, 1], 20, {"Male": 1})
        assert set(males.ids[males.ids >= 0].tolist()) <= {ids[i] for i in kept if i % 2}
        if not read_only:  # and it takes writes
            [new_id] = reopened.add([item(30, 1)], vectors(1, seed=4))
            assert new_id in reopened.store.ids("Eyeglasses").tolist()
            assert reopened.vectors([new_id], "Eyeglasses").shape == (1, DIM)
        reopened.close()
