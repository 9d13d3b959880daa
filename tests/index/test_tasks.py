"""index.tasks: a child run checked against a gallery's per-task fingerprints, a gallery's stored images
embedded under a new task only, and ``Gallery.add_task``/``remove_task`` (durable, replayable after)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from index.build import embed_images
from index.gallery import Gallery, GalleryError
from index.gallery_files import StorageFull
from index.metadata import NewItem, content_hash
from index.store import UnknownTaskError
from index.tasks import ImagesNotStoredError, check_run, embed_stored, stored_batches
from model.run import load_run, save_run
from model.tasks import fingerprints
from tests.factories import GALLERY_SIZE, TASKS, face, make_child_run, make_gallery, tiny_model
from tests.index.conftest import end_process_state, needs_milvus_lite
from tests.volumes import small_volume

NEW = "Bald"


@pytest.fixture(scope="module")
def child_dir(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_child_run(run_dir, tmp_path_factory.mktemp("child") / "run", NEW)


def test_check_run_accepts_a_child_for_old_tasks_and_asks_for_the_new_one(
    run_dir: Path, child_dir: Path
) -> None:
    built = load_run(run_dir).fingerprints
    check = check_run(built.shared, built.tasks, load_run(child_dir).fingerprints)
    assert check.valid == TASKS and check.missing == [NEW] and not check.changed and not check.dropped
    assert check.problem is None


def test_check_run_refuses_an_unrelated_model_and_a_changed_task(run_dir: Path) -> None:
    built = load_run(run_dir).fingerprints
    other = fingerprints(tiny_model(seed=1, perturb=0.6))
    check = check_run(built.shared, built.tasks, other)
    assert not check.shared_matches and check.valid == []
    assert check.problem is not None and "rebuild the index" in check.problem
    model = load_run(run_dir).model
    with torch.no_grad():
        model.trunk(0).modulations["emb"].weight[1] += 0.1  # Eyeglasses' rows only
    check = check_run(built.shared, built.tasks, fingerprints(model))
    assert check.shared_matches and check.changed == ["Eyeglasses"]
    assert check.problem is not None and "Eyeglasses differently" in check.problem


def test_stored_images_embed_under_the_new_task_and_old_tasks_still_match(
    gallery_template: Path, child_dir: Path
) -> None:
    child = load_run(child_dir)
    gallery = Gallery.open(gallery_template, read_only=True)
    try:
        rows = list(embed_stored(child, NEW, stored_batches(gallery.metadata, batch=10)))
        ids = np.concatenate([i for i, _ in rows])
        assert len(ids) == GALLERY_SIZE and [len(i) for i, _ in rows] == [10, 10, 4]
        vectors = np.concatenate([v for _, v in rows])  # (N, D)
        assert vectors.shape == (GALLERY_SIZE, child.embedding_dim)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        # An old task recomputed by the child from the stored bytes is what the gallery holds for it
        # (another batch composition than the build's: equal to float rounding).
        old = np.concatenate([v for _, v in embed_stored(child, "Smiling", stored_batches(gallery.metadata))])
        np.testing.assert_allclose(old, gallery.store.get("Smiling", ids), atol=1e-5, rtol=0)
    finally:
        gallery.close()
    with pytest.raises(KeyError, match="task Nope is not in the run"):
        next(embed_stored(child, "Nope", iter([])))


def test_a_gallery_without_stored_images_says_to_pass_them(run_dir: Path, tmp_path: Path) -> None:
    run = load_run(run_dir)
    gallery = Gallery.create(
        tmp_path / "g", tasks=run.task_names, dim=run.embedding_dim, model_hash=run.model_hash
    )
    try:
        items = [NewItem(f"{i}.png", f"{i:064x}", 48, 48, face(i)[1], None) for i in range(3)]
        gallery.add(
            items, np.ones((3, len(TASKS), run.embedding_dim), dtype=np.float32) / np.sqrt(run.embedding_dim)
        )
        with pytest.raises(
            ImagesNotStoredError, match=r"3 of 3 gallery images were not stored.*--images DIR"
        ):
            next(stored_batches(gallery.metadata))
    finally:
        gallery.close()


# --- wired: the gallery records fingerprints, accepts a child run, adds and removes a task ---------------


def open_for(root: Path, run_path: Path, **kwargs: Any) -> Gallery:
    run = load_run(run_path)
    return Gallery.open(root, model_hash=run.model_hash, fingerprints=run.fingerprints, **kwargs)


def test_a_gallery_records_fingerprints_and_a_child_run_opens_it_for_its_old_tasks(
    index_dir: Path, run_dir: Path, child_dir: Path
) -> None:
    config = json.loads((index_dir / "gallery.json").read_text())
    assert config["fingerprints"] == load_run(run_dir).fingerprints.to_dict()
    gallery = open_for(index_dir, child_dir)
    try:
        assert gallery.task_check is not None
        assert gallery.task_check.valid == TASKS and gallery.task_check.missing == [NEW]
        assert gallery.info().fingerprints
    finally:
        gallery.close()
    other = tmp_run(index_dir.parent / "other", tiny_model(seed=1, perturb=0.6))
    with pytest.raises(GalleryError, match="shared weights are not the ones the gallery was built with"):
        open_for(index_dir, other)


def test_a_gallery_without_fingerprints_keeps_the_model_hash_check(
    run_dir: Path, child_dir: Path, tmp_path: Path
) -> None:
    index_dir = make_gallery(run_dir, tmp_path / "old", size=4, fingerprints=False)
    with pytest.raises(GalleryError, match="rebuild the index with this run"):
        open_for(index_dir, child_dir, read_only=True)
    open_for(index_dir, run_dir, read_only=True).close()


def tmp_run(path: Path, model: Any) -> Path:
    save_run(path, model)
    return path


def test_add_task_indexes_the_stored_images_durably_and_later_adds_replay(
    index_dir: Path, child_dir: Path
) -> None:
    child = load_run(child_dir)
    gallery = open_for(index_dir, child_dir)
    seen: list[int] = []
    try:
        old = {task: gallery.vectors(gallery.metadata.ids(), task) for task in TASKS}
        assert gallery.add_task(NEW, child, progress=seen.append) == GALLERY_SIZE
        assert sum(seen) == GALLERY_SIZE and gallery.tasks == [*TASKS, NEW]
        ids = gallery.metadata.ids()
        for task in TASKS:  # untouched
            np.testing.assert_array_equal(gallery.vectors(ids, task), old[task])
        expected = np.concatenate([v for _, v in embed_stored(child, NEW, stored_batches(gallery.metadata))])
        np.testing.assert_array_equal(gallery.vectors(ids, NEW), expected)
        # An add after the change carries a vector for every task, the new one included; it stays in
        # the log only (no snapshot on close), so reopening replays it onto the generation of the change.
        data, labels = face(900)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        item = NewItem("late.png", content_hash(data), image.width, image.height, labels, data)
        (late,) = gallery.add([item], embed_images(child, [image]))
        late_vector = gallery.vectors([late], NEW)
    finally:
        gallery.close(snapshot=False)
    config = json.loads((index_dir / "gallery.json").read_text())
    assert config["tasks"] == [*TASKS, NEW]
    assert config["fingerprints"]["tasks"] == child.fingerprints.tasks
    manifests = [json.loads(p.read_text()) for p in (index_dir / "store").glob("manifest-*.json")]
    assert len(manifests) == 2 and all(m["tasks"] == [*TASKS, NEW] for m in manifests)  # both fall-backs
    reopened = open_for(index_dir, child_dir)
    try:
        assert reopened.task_check is not None and reopened.task_check.valid == [*TASKS, NEW]
        assert reopened.store.count(NEW) == GALLERY_SIZE + 1
        np.testing.assert_array_equal(reopened.vectors([late], NEW), late_vector)
        np.testing.assert_array_equal(reopened.vectors(ids, NEW), expected)
        report = reopened.verify(fingerprints=child.fingerprints)
        assert report.ok, report.problems
        assert any("task fingerprints" in line for line in report.checked)
        with pytest.raises(GalleryError, match=r"already indexes Bald.*remove-task"):
            reopened.add_task(NEW, child)
    finally:
        reopened.close()


def test_items_added_and_removed_while_a_task_is_embedded_are_settled(
    run_dir: Path, child_dir: Path, tmp_path: Path
) -> None:
    # As when a service serving the gallery indexes a task: writes go on while the images are embedded.
    root = make_gallery(run_dir, tmp_path / "live", size=3 * 64 + 5)  # four batches of stored images
    child = load_run(child_dir)
    gallery = open_for(root, child_dir)
    late: list[int] = []
    removed = [2, 150]  # one in the first batch, already embedded; one not yet embedded

    def meanwhile(_: int) -> None:
        if late:
            return
        data, labels = face(500)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        item = NewItem("late.png", content_hash(data), image.width, image.height, labels, data)
        late.extend(gallery.add([item], embed_images(child, [image])[:, : len(TASKS)]))
        assert gallery.remove(removed) == 2

    try:
        assert gallery.add_task(NEW, child, progress=meanwhile) == 3 * 64 + 5 - 2 + 1
        ids = np.sort(gallery.metadata.ids())
        assert late[0] in ids and not set(removed) & set(ids)
        assert gallery.store.count(NEW) == len(ids)
        expected = np.concatenate([v for _, v in embed_stored(child, NEW, stored_batches(gallery.metadata))])
        np.testing.assert_allclose(gallery.vectors(ids, NEW), expected, atol=1e-6)
        report = gallery.verify(fingerprints=child.fingerprints)
        assert report.ok, report.problems
    finally:
        gallery.close()


def test_add_task_on_a_gallery_without_stored_images_needs_them_given(
    run_dir: Path, child_dir: Path, tmp_path: Path
) -> None:
    parent, child = load_run(run_dir), load_run(child_dir)
    root, folder = tmp_path / "g", tmp_path / "originals"
    folder.mkdir()
    gallery = Gallery.create(
        root,
        tasks=TASKS,
        dim=parent.embedding_dim,
        model_hash=parent.model_hash,
        fingerprints=parent.fingerprints,
    )
    images: dict[str, Path] = {}
    try:
        items, decoded = [], []
        for i in range(5):
            data, labels = face(i)
            (folder / f"{i}.png").write_bytes(data)
            images[content_hash(data)] = folder / f"{i}.png"
            decoded.append(Image.open(io.BytesIO(data)).convert("RGB"))
            items.append(NewItem(f"{i}.png", content_hash(data), 48, 48, labels, None))
        gallery.add(items, embed_images(parent, decoded))
    finally:
        gallery.close()
    gallery = open_for(root, child_dir)
    try:
        with pytest.raises(
            ImagesNotStoredError, match=r"5 of 5 gallery images were not stored.*--images DIR"
        ):
            gallery.add_task(NEW, child)
        partial = dict(list(images.items())[:3])
        with pytest.raises(
            ImagesNotStoredError, match="2 of 5 gallery images were not stored nor among the 3"
        ):
            gallery.add_task(NEW, child, images=partial)
        assert gallery.tasks == TASKS  # nothing changed
        assert gallery.add_task(NEW, child, images=images) == 5
        assert gallery.store.count(NEW) == 5
    finally:
        gallery.close()


def test_a_task_change_without_room_on_the_disk_is_undone(
    index_dir: Path, run_dir: Path, tmp_path: Path
) -> None:
    """Its snapshot cannot be written: the task stays (searchable, as before), the gallery takes writes
    again once there is room, and it reopens as it was."""
    with small_volume(tmp_path / "vol", "64m") as volume:
        root = volume.root / "index"
        shutil.copytree(index_dir, root)
        (root / "writer.lock").unlink(missing_ok=True)
        gallery = open_for(root, run_dir)
        try:
            query = np.ones((1, gallery.embedding_dim), dtype=np.float32)
            before = gallery.search("Eyeglasses", query, 5)
            volume.fill(leave=4096)
            with pytest.raises(StorageFull, match="no room to write"):
                gallery.remove_task("Eyeglasses")
            assert gallery.tasks == TASKS and gallery.store.tasks() == TASKS
            np.testing.assert_array_equal(gallery.search("Eyeglasses", query, 5).ids, before.ids)
            volume.free()
            data = face(999)[0]
            item = NewItem("new.png", content_hash(data), 48, 48, {}, data)
            [new_id] = gallery.add([item], np.ones((1, len(TASKS), gallery.embedding_dim), dtype=np.float32))
        finally:
            gallery.close()
        reopened = open_for(root, run_dir)
        try:
            assert reopened.tasks == TASKS and new_id in reopened.metadata.ids().tolist()
            assert reopened.verify().ok
        finally:
            reopened.close()


def test_remove_task_drops_one_index_durably(index_dir: Path, run_dir: Path) -> None:
    gallery = open_for(index_dir, run_dir)
    try:
        gallery.remove_task("Eyeglasses")
        assert gallery.tasks == [t for t in TASKS if t != "Eyeglasses"]
        with pytest.raises(GalleryError, match="has no index for Eyeglasses"):
            gallery.remove_task("Eyeglasses")
    finally:
        gallery.close()
    config = json.loads((index_dir / "gallery.json").read_text())
    assert "Eyeglasses" not in config["tasks"] and "Eyeglasses" not in config["fingerprints"]["tasks"]
    reopened = open_for(index_dir, run_dir)  # the run still has the task: it is reported, not refused
    try:
        assert reopened.task_check is not None and reopened.task_check.missing == ["Eyeglasses"]
        assert reopened.store.tasks() == config["tasks"]
        with pytest.raises(UnknownTaskError):
            reopened.vectors([0], "Eyeglasses")
        assert reopened.verify().ok
    finally:
        reopened.close()


def test_a_child_of_the_gallerys_model_gives_an_old_gallery_its_fingerprints(
    run_dir: Path, child_dir: Path, tmp_path: Path
) -> None:
    index_dir = make_gallery(run_dir, tmp_path / "old", size=4, fingerprints=False)
    gallery = Gallery.open(index_dir)  # no run given: opens as before
    try:
        gallery.add_task(NEW, load_run(child_dir))  # the child's lineage names the gallery's model
    finally:
        gallery.close()
    reopened = open_for(index_dir, child_dir)
    try:
        assert reopened.task_check is not None and reopened.task_check.valid == [*TASKS, NEW]
    finally:
        reopened.close()


@needs_milvus_lite
def test_a_milvus_gallery_adds_and_removes_a_task_and_reopens(
    run_dir: Path, child_dir: Path, tmp_path: Path
) -> None:
    parent, child = load_run(run_dir), load_run(child_dir)
    root = tmp_path / "milvus-gallery"
    gallery = Gallery.create(
        root,
        tasks=TASKS,
        dim=parent.embedding_dim,
        model_hash=parent.model_hash,
        backend="milvus",
        fingerprints=parent.fingerprints,
    )
    try:
        items, decoded = [], []
        for i in range(6):
            data, labels = face(i)
            decoded.append(Image.open(io.BytesIO(data)).convert("RGB"))
            items.append(NewItem(f"{i}.png", content_hash(data), 48, 48, labels, data))
        gallery.add(items, embed_images(parent, decoded))
        gallery.save()
        assert gallery.add_task(NEW, child) == 6
        gallery.remove_task("Eyeglasses")  # a middle task: the later collections keep their names
        kept = [t for t in TASKS if t != "Eyeglasses"] + [NEW]
        assert gallery.tasks == kept
        bald = gallery.vectors(gallery.metadata.ids(), NEW)
        uri = gallery.store.uri  # type: ignore[attr-defined]
    finally:
        gallery.close()
    end_process_state(uri)
    reopened = open_for(root, child_dir)
    try:
        assert reopened.task_check is not None and reopened.task_check.valid == kept
        assert {t: reopened.store.count(t) for t in kept} == dict.fromkeys(kept, 6)
        np.testing.assert_array_equal(reopened.vectors(reopened.metadata.ids(), NEW), bald)
        assert reopened.verify(fingerprints=child.fingerprints).ok
    finally:
        reopened.close()
