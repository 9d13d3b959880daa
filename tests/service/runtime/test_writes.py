"""Gallery writes from the service: a gallery that cannot take writes is a clean 503, never a 500; the
gallery takes its own tasks' columns of the run's vectors, as they are when it stores them."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.build import embed_images
from index.gallery import Gallery
from index.metadata import NewItem, content_hash
from model.run import load_run
from service.api.errors import status_of
from service.runtime.errors import GalleryOutOfDate, Unavailable
from service.runtime.writes import GalleryWriter, gallery_columns
from tests.factories import face, make_child_run, make_gallery


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
            writer.add([item], vectors, gallery.tasks)
    finally:
        gallery.close()


def test_the_gallery_takes_its_own_columns_and_refuses_a_task_the_run_lacks() -> None:
    vectors = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # 2 items under the run's 3 tasks
    picked = gallery_columns(vectors, ["a", "b", "c"], ["c", "a"])
    np.testing.assert_array_equal(picked, vectors[:, [2, 0]])
    with pytest.raises(GalleryOutOfDate, match="the gallery indexes d"):
        gallery_columns(vectors, ["a", "b", "c"], ["a", "d"])


def test_an_add_racing_a_task_change_stores_the_new_columns(index_dir: Path, tmp_path: Path) -> None:
    # The run embeds under 5 tasks; the gallery indexes 4 when the upload is embedded and 3 when it is
    # stored (a task removed in between): the add takes the columns of the list that it is stored under.
    gallery = Gallery.open(index_dir)
    try:
        writer = GalleryWriter(gallery)
        run_tasks = [*gallery.tasks, "Added"]
        dropped = gallery.tasks[1]
        data = b"\x89PNG-like bytes of a test item"
        item = NewItem(source="r.png", content_hash="1" * 64, width=1, height=1, labels={}, data=data)
        vectors = np.random.default_rng(0).normal(size=(1, len(run_tasks), gallery.embedding_dim))
        vectors = (vectors / np.linalg.norm(vectors, axis=2, keepdims=True)).astype(np.float32)
        original = gallery.insert
        calls = []

        def insert_after_a_change(items, picked):  # the change lands between picking and storing
            if not calls:
                calls.append(picked.shape)
                gallery.remove_task(dropped)
                return original(items, picked)  # the stale columns: refused
            calls.append(picked.shape)
            return original(items, picked)

        gallery.insert = insert_after_a_change  # type: ignore[method-assign]
        (added,) = writer.add([item], vectors, run_tasks)
        assert [shape[1] for shape in calls] == [len(run_tasks) - 1, len(run_tasks) - 2]
        for task in gallery.tasks:
            stored = gallery.vectors([added.id], task)[0]
            np.testing.assert_allclose(stored, vectors[0, run_tasks.index(task)], atol=1e-6)
    finally:
        gallery.close()


def test_uploads_during_a_task_change_wait_for_it_and_land_in_every_task(
    run_dir: Path, tmp_path: Path
) -> None:
    # A service indexing a task (POST /admin/tasks/{task}/index) while it takes uploads: no upload fails,
    # and every one ends up under every task, the new one included.
    root = make_gallery(run_dir, tmp_path / "g", size=150)
    child_dir = make_child_run(run_dir, tmp_path / "child", "Bald")
    child = load_run(child_dir)
    gallery = Gallery.open(root, model_hash=child.model_hash, fingerprints=child.fingerprints)
    writer = GalleryWriter(gallery)
    stop = threading.Event()
    added: list[int] = []
    errors: list[BaseException] = []

    def uploads() -> None:
        i = 0
        while not stop.is_set() or i < 5:
            data, labels = face(1000 + i)
            image = Image.open(io.BytesIO(data)).convert("RGB")
            item = NewItem(f"u{i}.png", content_hash(data), image.width, image.height, labels, data)
            try:
                (result,) = writer.add([item], embed_images(child, [image]), child.task_names)
                added.append(result.id)
            except BaseException as e:  # the test reports any failure below
                errors.append(e)
                return
            i += 1

    thread = threading.Thread(target=uploads)
    try:
        thread.start()
        gallery.add_task("Bald", child)
        stop.set()
        thread.join(60)
        assert not errors, errors
        assert len(added) >= 5
        ids = gallery.metadata.ids()
        assert set(added) <= set(ids.tolist())
        for task in gallery.tasks:
            assert gallery.store.count(task) == len(ids), task
        report = gallery.verify(fingerprints=child.fingerprints)
        assert report.ok, report.problems
    finally:
        stop.set()
        thread.join(60)
        gallery.close()
