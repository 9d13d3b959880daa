"""The embedding pipeline: every image under every task in one pass, matching per-task ``embed``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from index.build import build_gallery, dataset_source, embed_images, folder_source
from index.gallery import Gallery
from model.network import ModelConfig, create_model
from model.run import LoadedRun, load_run, save_run

TASKS = ["Smiling", "Eyeglasses", "Male"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> LoadedRun:
    torch.manual_seed(0)
    config = ModelConfig(task_names=TASKS, backbone="resnet18", width=8, image_size=32, embedding_dim=16)
    run_dir = tmp_path_factory.mktemp("run")
    model = create_model(config)
    with torch.no_grad():  # move the modulations off their all-ones start so that tasks differ
        for parameter in model.modulation_parameters():
            parameter.add_(torch.rand_like(parameter))
    save_run(run_dir, model)
    return load_run(run_dir)


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
