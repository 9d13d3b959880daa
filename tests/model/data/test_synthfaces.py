"""SynthFaces: deterministic, balanced, hair labels consistent with what is drawn, any size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.data.base import DataFormatError
from model.data.synthfaces import ALL_TASKS, DEFAULT_TASKS, SynthFaces, render_face, sample_labels

HAIR = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")


def test_same_seed_and_index_give_identical_pixels() -> None:
    first, labels = render_face(3, 7, 64)
    again, labels_again = render_face(3, 7, 64)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert labels == labels_again


def test_different_seeds_and_indices_differ() -> None:
    base = np.asarray(render_face(0, 5, 48)[0])
    assert not np.array_equal(base, np.asarray(render_face(1, 5, 48)[0]))
    assert not np.array_equal(base, np.asarray(render_face(0, 6, 48)[0]))


@pytest.mark.parametrize("size", [16, 32, 64, 97, 224])
def test_any_image_size(size: int) -> None:
    image, labels = render_face(0, 1, size)
    assert image.size == (size, size)
    assert image.mode == "RGB"
    assert set(labels) == set(ALL_TASKS)


def test_labels_do_not_depend_on_image_size() -> None:
    assert render_face(2, 9, 32)[1] == render_face(2, 9, 128)[1] == sample_labels(2, 9)


def test_label_balance() -> None:
    rows = [sample_labels(0, i) for i in range(600)]
    rate = {name: np.mean([row[name] for row in rows]) for name in ALL_TASKS}
    for name in ALL_TASKS:
        if name in HAIR:  # one of four colours, and none on bald heads: about 1/8
            assert 0.07 < rate[name] < 0.19, (name, rate[name])
        else:
            assert 0.42 < rate[name] < 0.58, (name, rate[name])


def test_hair_labels_follow_the_visible_hair_factor() -> None:
    for i in range(300):
        labels = sample_labels(1, i)
        hair = sum(labels[name] for name in HAIR)
        assert hair == (0 if labels["Bald"] else 1), labels


def test_dataset_labels_sources_and_images_match_render_face() -> None:
    data = SynthFaces(num_images=12, image_size=32, seed=4)
    assert data.task_names == list(DEFAULT_TASKS)
    assert data.labels.shape == (12, len(DEFAULT_TASKS))
    assert data.labels.dtype == np.int64
    assert all(task.values == ("0", "1") for task in data.tasks)
    assert data.sources[3] == "synthfaces/4/000003"
    assert data.groups is None
    image, labels = render_face(4, 3, 32)
    assert np.array_equal(np.asarray(data.load_image(3)), np.asarray(image))
    assert data.labels[3].tolist() == [labels[name] for name in DEFAULT_TASKS]


def test_task_selection_is_case_insensitive() -> None:
    data = SynthFaces(num_images=5, image_size=16, tasks=["smiling", "GRAY_HAIR"])
    assert data.task_names == ["Smiling", "Gray_Hair"]
    with pytest.raises(DataFormatError, match="valid tasks: Smiling"):
        SynthFaces(num_images=5, image_size=16, tasks=["Young"])


def test_disk_cache_is_written_once_and_reused(tmp_path: Path) -> None:
    data = SynthFaces(num_images=6, image_size=24, seed=2, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == ["synthfaces-seed2-n6-24px.npy"]  # no temporary file left behind
    stamp = files[0].stat().st_mtime_ns
    again = SynthFaces(num_images=6, image_size=24, seed=2, cache_dir=tmp_path)
    assert files[0].stat().st_mtime_ns == stamp
    for i in range(6):
        expected = np.asarray(render_face(2, i, 24)[0])
        assert np.array_equal(data.pixels(i), expected)
        assert np.array_equal(np.asarray(again.load_image(i)), expected)
