"""index.tasks (not yet wired): a child run checked against a gallery's per-task fingerprints, and a
gallery's stored images embedded under a new task only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from index.gallery import Gallery
from index.metadata import NewItem
from index.tasks import ImagesNotStoredError, check_run, embed_stored, stored_batches
from model.run import load_run, save_run
from model.tasks import append_tasks, fingerprints, new_task
from tests.factories import GALLERY_SIZE, TASKS, face, tiny_model

NEW = "Bald"


@pytest.fixture(scope="module")
def child_dir(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    parent = load_run(run_dir).model
    grown = append_tasks(parent, new_task(parent, NEW, seed=2))
    out = tmp_path_factory.mktemp("child")
    save_run(out, grown)
    return out


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
