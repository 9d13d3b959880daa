"""The embedding pipeline: every image under every task in one pass, matching per-task ``embed``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from index.build import build_gallery, dataset_source, embed_images, folder_source
from index.gallery import Gallery
from index.metadata import content_hash
from model.run import LoadedRun, load_run
from tests.factories import make_run, stored_blob

TASKS = ["Smiling", "Eyeglasses", "Male"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> LoadedRun:
    return load_run(make_run(tmp_path_factory.mktemp("run"), task_names=TASKS, embedding_dim=16))


def test_all_task_embedding_matches_per_task_embed(tiny_run: LoadedRun) -> None:
    dataset = dataset_source("synthfaces", image_size=32, num_images=5)
    images = [item.image for item in dataset.items]
    together = embed_images(tiny_run, images)
    assert together.shape == (5, len(TASKS), 16)
    batch = tiny_run.preprocess.stack(images)
    for t in range(len(TASKS)):
        with torch.inference_mode():
            alone = tiny_run.model.embed(batch, torch.full((5,), t, dtype=torch.long)).numpy()
        np.testing.assert_allclose(together[:, t], alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=2), 1.0, atol=1e-5)
    assert not np.allclose(together[:, 0], together[:, 1], atol=1e-3)


def test_embed_images_columns_match_a_task_subset_call(tiny_run: LoadedRun) -> None:
    """``embed_images`` is ``embed_tasks`` over all tasks: a subset of its columns is the subset call."""
    images = [item.image for item in dataset_source("synthfaces", image_size=32, num_images=3).items]
    every = embed_images(tiny_run, images)
    with torch.inference_mode():
        subset = tiny_run.model.embed_tasks(tiny_run.preprocess.stack(images), [2, 0]).numpy()
    np.testing.assert_allclose(subset, every[:, [2, 0]], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_embed_images_on_a_cuda_run_matches_the_cpu_run(tiny_run: LoadedRun) -> None:
    images = [item.image for item in dataset_source("synthfaces", image_size=32, num_images=4).items]
    on_gpu = load_run(tiny_run.run_dir, "cuda")  # the batch is decoded on the CPU, moved by the model
    np.testing.assert_allclose(embed_images(on_gpu, images), embed_images(tiny_run, images), atol=1e-4)


def test_build_from_folder_dedupes_and_skips_unreadable(tiny_run: LoadedRun, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "sub" / "copy.png").write_bytes((folder / "3.png").read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    progress: list[int] = []
    report = build_gallery(
        tiny_run, folder_source(folder), tmp_path / "index", batch_size=3, progress=progress.append
    )
    assert (report.images, report.added, report.duplicates) == (8, 7, 1)
    assert len(report.skipped) == 1 and report.skipped[0].startswith("broken.jpg")
    assert sum(progress) == 8 and report.tasks == TASKS
    assert min(report.timings.read_s, report.timings.embed_s, report.timings.write_s) > 0
    gallery = Gallery.open(tmp_path / "index", model_hash=tiny_run.model_hash, read_only=True)
    assert gallery.info().counts == {task: 7 for task in TASKS}
    record = gallery.items([7])[7]  # ids follow sorted file order: 0.png is 1
    assert (record.source, record.width, record.height) == ("6.png", 24, 26)
    blob = stored_blob(gallery, record)  # the file's own bytes, kept in the gallery (never served by path)
    assert blob is not None and blob.read_bytes() == (folder / "6.png").read_bytes()
    assert gallery.verify(tiny_run.model_hash).ok
    gallery.close()
    with pytest.raises(FileExistsError, match="not empty"):
        build_gallery(tiny_run, folder_source(folder), tmp_path / "index")


def test_build_from_dataset_keeps_labels(tiny_run: LoadedRun, tmp_path: Path) -> None:
    report = build_gallery(
        tiny_run, dataset_source("synthfaces", image_size=32, num_images=12), tmp_path / "index", batch_size=5
    )
    assert report.added == 12
    gallery = Gallery.open(tmp_path / "index", read_only=True)
    labels = gallery.items([1])[1].labels
    assert labels and set(labels.values()) <= {0, 1}
    name, value = next(iter(labels.items()))
    query = embed_images(
        tiny_run, [next(dataset_source("synthfaces", image_size=32, num_images=1).items).image]
    )
    result = gallery.search(TASKS[0], query[:, 0], 3, {name: value})
    assert result.ids[0, 0] == 1 and result.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    gallery.close()


def test_build_from_dataset_keeps_image_bytes(tiny_run: LoadedRun, tmp_path: Path) -> None:
    """Generated images are kept as PNG (hash = the PNG's), so the service can show every item."""
    build_gallery(tiny_run, dataset_source("synthfaces", image_size=32, num_images=6), tmp_path / "index")
    gallery = Gallery.open(tmp_path / "index", read_only=True)
    faces = list(dataset_source("synthfaces", image_size=32, num_images=6).items)
    records = gallery.items(gallery.metadata.ids())
    assert len(records) == 6
    for face, record in zip(faces, records.values(), strict=True):
        blob = stored_blob(gallery, record)
        assert blob is not None and blob.name == record.content_hash
        data = blob.read_bytes()
        assert data.startswith(b"\x89PNG") and content_hash(data) == record.content_hash
        with Image.open(blob) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(face.image))
    assert "6 blobs present" in gallery.verify().checked
    gallery.close()


def test_build_from_a_dataset_of_files_keeps_the_files(tiny_run: LoadedRun, tmp_path: Path) -> None:
    """A dataset that reads files keeps each file's bytes; a format browsers cannot show becomes PNG."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)) for _ in range(3)]
    images[0].save(data_dir / "a.jpg", quality=90)
    images[1].save(data_dir / "b.png")
    images[2].save(data_dir / "c.tif")
    (data_dir / "labels.csv").write_text("filename,Smiling\na.jpg,1\nb.png,0\nc.tif,1\n")
    build_gallery(tiny_run, dataset_source("folder", data_dir), tmp_path / "index")
    gallery = Gallery.open(tmp_path / "index", read_only=True)
    by_source = {r.source: r for r in gallery.items(gallery.metadata.ids()).values()}
    assert sorted(by_source) == ["a.jpg", "b.png", "c.tif"]
    for name in ("a.jpg", "b.png"):
        blob = stored_blob(gallery, by_source[name])
        assert blob is not None and blob.read_bytes() == (data_dir / name).read_bytes()
    tiff = stored_blob(gallery, by_source["c.tif"])
    assert tiff is not None and tiff.read_bytes().startswith(b"\x89PNG")
    with Image.open(tiff) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(images[2]))
    assert by_source["a.jpg"].labels == {"Smiling": 1}
    gallery.close()


def test_build_without_image_bytes(tiny_run: LoadedRun, tmp_path: Path) -> None:
    source = dataset_source("synthfaces", image_size=32, num_images=4)
    report = build_gallery(tiny_run, source, tmp_path / "index", store_images=False)
    assert report.added == 4
    gallery = Gallery.open(tmp_path / "index", read_only=True)
    records = gallery.items(gallery.metadata.ids()).values()
    assert all(stored_blob(gallery, r) is None for r in records)
    assert not (tmp_path / "index" / "blobs").exists()
    # The same content hashes as a build that keeps the bytes: an upload of a served image is a duplicate.
    faces = dataset_source("synthfaces", image_size=32, num_images=4).items
    assert [r.content_hash for r in records] == [content_hash(f.data) for f in faces]
    gallery.close()


def _labelled_folder(root: Path, csv: str | None = "filename,colour,Smiling\n0.png,green,1\n1.png,red,0\n"):
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(3):  # 2.png is not in the CSV
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
    if csv is not None:
        (root / "labels.csv").write_text(csv)
    return root


def test_build_from_a_folder_keeps_its_csv_labels_by_name(tiny_run: LoadedRun, tmp_path: Path) -> None:
    """``--images DIR`` with DIR/labels.csv: categorical values stay names, binary ones 0/1, files the
    CSV does not list get none; filters match the names."""
    source = folder_source(_labelled_folder(tmp_path / "images"))
    assert (source.labelled, source.total) == (2, 3)
    build_gallery(tiny_run, source, tmp_path / "index")
    gallery = Gallery.open(tmp_path / "index", read_only=True)
    try:
        items = gallery.items([1, 2, 3])
        assert items[1].labels == {"colour": "green", "Smiling": 1}
        assert items[2].labels == {"colour": "red", "Smiling": 0}
        assert items[3].labels == {}
        assert gallery.metadata.matching({"colour": "green"}).tolist() == [1]
        assert gallery.metadata.matching({"colour": "red", "Smiling": 0}).tolist() == [2]
        assert gallery.metadata.matching({"Smiling": "1"}).tolist() == [1]  # "1" and 1 are one value
        assert gallery.metadata.matching({"colour": "blue"}).tolist() == []
    finally:
        gallery.close()


def test_a_labels_csv_given_explicitly_or_malformed(tmp_path: Path) -> None:
    folder = _labelled_folder(tmp_path / "images", csv=None)
    other = tmp_path / "elsewhere.csv"
    other.write_text("filename,size\n./2.png,large\n")
    source = folder_source(folder, other)
    assert [item.labels for item in source.items] == [{}, {}, {"size": "large"}]
    assert folder_source(folder).labels_from is None  # no labels.csv: no labels, no error
    (folder / "labels.csv").write_text("name,size\n0.png,1\n")
    with pytest.raises(ValueError, match=r"labels.csv:1: no 'filename' column"):
        folder_source(folder)


def test_a_folder_dataset_source_stores_names_not_label_ids(tmp_path: Path) -> None:
    """``index build --dataset folder`` (the training view of a folder) stores the same names."""
    folder = _labelled_folder(tmp_path / "images", csv="filename,colour,Smiling\n0.png,green,1\n1.png,red,\n")
    labels = [item.labels for item in dataset_source("folder", folder, image_size=16).items]
    assert labels == [{"colour": "green", "Smiling": 1}, {"colour": "red"}]
