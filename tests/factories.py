"""The one place tests build tiny models, runs on disk, test images and galleries.

Every builder takes the model's configuration as keyword overrides of one tiny default, so a test states
only what it needs (``tiny_model(arch="mask", width=4)``, ``make_run(path, task_names=["A", "B"])``):

- ``tiny_config(**overrides)`` -> a ``ModelConfig``: ``TASKS``, resnet18, width 8, 32-pixel images,
  16-dimensional embeddings, unless overridden (any ``ModelConfig`` field: arch, modulation, backbone,
  modulate, modulation_init, neck, ...).
- ``tiny_model(seed=0, perturb=0.0, **overrides)`` -> a seeded ``MultiTaskEmbedder`` in eval mode; with
  ``perturb`` > 0 every modulation parameter is moved by ``perturb * N(0, 1)`` off its initial value
  (untrained modulation is the identity: a perturbed model's tasks disagree, as trained ones do).
- ``tiny_train_config(**overrides)`` -> a ``TrainConfig`` that trains such a model on the CPU in seconds
  (width 4, 32-pixel images, 8 dimensions, 6 steps of 2 triplets per task); pass ``data`` for the dataset.
- ``make_run(run_dir, seed=0, perturb=0.6, **overrides)`` -> a run directory (``save_run``) with a
  ``metrics.json`` like training writes.
- ``encode``/``face``: image bytes; ``make_gallery(run_dir, out, size, seed)``: a real gallery of rendered
  faces labelled under the run's tasks; ``copy_gallery``: a copy for a test that changes it.

The root ``tests/conftest.py`` turns these into the session fixtures ``run_dir`` and
``gallery_template`` and the per-test ``index_dir`` copy.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from index.build import embed_images
from index.gallery import Gallery
from index.metadata import ItemRecord, NewItem, content_hash
from model.data.synthfaces import render_face
from model.network import ModelConfig, MultiTaskEmbedder, create_model
from model.run import METRICS, load_run, save_run, write_json
from model.tasks import append_tasks, new_task
from model.train import TrainConfig

TASKS = ["Smiling", "Eyeglasses", "Black_Hair", "Wearing_Hat"]
IMAGE_SIZE = 32
GALLERY_SEED = 7
GALLERY_SIZE = 24
RUN_PERTURB = 0.6

_DEFAULTS: dict[str, Any] = {
    "task_names": TASKS,
    "backbone": "resnet18",
    "width": 8,
    "image_size": IMAGE_SIZE,
    "embedding_dim": 16,
}


def tiny_config(**overrides: Any) -> ModelConfig:
    """The tiny default ``ModelConfig`` with ``overrides`` (any of its fields) applied."""
    values = {**_DEFAULTS, **overrides}
    values["task_names"] = list(values["task_names"])
    return ModelConfig(**values)


def tiny_model(*, seed: int = 0, perturb: float = 0.0, **overrides: Any) -> MultiTaskEmbedder:
    """``create_model(tiny_config(**overrides))`` under ``torch.manual_seed(seed)``, in eval mode; with
    ``perturb``, each modulation parameter gets ``perturb * randn`` added (drawn right after creation)."""
    torch.manual_seed(seed)
    model = create_model(tiny_config(**overrides))
    if perturb:
        with torch.no_grad():
            for parameter in model.modulation_parameters():
                parameter.add_(perturb * torch.randn_like(parameter))
    return model.eval()


def tiny_train_config(**overrides: Any) -> TrainConfig:
    """A ``TrainConfig`` for a few CPU seconds of training, with ``overrides`` (any of its fields) applied."""
    values: dict[str, Any] = {
        "width": 4,
        "image_size": IMAGE_SIZE,
        "embedding_dim": 8,
        "steps": 6,
        "per_task": 2,
        "val_triplets_per_task": 20,
        "device": "cpu",
        **overrides,
    }
    return TrainConfig(**values)


def make_run(run_dir: Path, *, seed: int = 0, perturb: float = RUN_PERTURB, **overrides: Any) -> Path:
    """A run directory holding ``tiny_model(seed=seed, perturb=perturb, **overrides)`` and a
    ``metrics.json`` with a test score per task; returns ``run_dir``."""
    model = tiny_model(seed=seed, perturb=perturb, **overrides)
    save_run(run_dir, model)
    tasks = model.config.task_names
    metrics = {
        "test": {"tasks": {t: {"triplet_accuracy": 0.5 + i / 10, "map": 0.3} for i, t in enumerate(tasks)}}
    }
    write_json(run_dir / METRICS, metrics)
    return run_dir


def make_child_run(parent_dir: Path, run_dir: Path, task: str = "Bald", *, seed: int = 2) -> Path:
    """What ``modret task add`` writes, in a fraction of a second: the run at ``parent_dir`` with ``task``
    appended (fresh rows, untrained: its old tasks embed bit for bit as the parent's), its lineage
    and a ``metrics.json`` giving ``task`` a test accuracy of 0.77; returns ``run_dir``."""
    parent = load_run(parent_dir)
    child = append_tasks(parent.model, new_task(parent.model, task, seed=seed))
    lineage = {"operation": "add_task", "task": task, "parent_model_hash": parent.model_hash}
    save_run(run_dir, child, extra={"lineage": [lineage]})
    metrics = json.loads((parent_dir / METRICS).read_text())
    metrics["test"]["tasks"][task] = {"triplet_accuracy": 0.77, "map": 0.4}
    write_json(run_dir / METRICS, metrics)
    return run_dir


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def face(
    index: int, seed: int = GALLERY_SEED, size: int = 48, tasks: Sequence[str] = TASKS
) -> tuple[bytes, dict[str, int]]:
    """A rendered synthetic face as PNG bytes and its labels under ``tasks``."""
    image, labels = render_face(seed, index, size)
    return encode(image), {name: labels[name] for name in tasks}


def make_gallery(
    run_dir: Path,
    index_dir: Path,
    size: int = GALLERY_SIZE,
    seed: int = GALLERY_SEED,
    *,
    fingerprints: bool = True,
) -> Path:
    """A gallery at ``index_dir`` of ``size`` faces embedded by the run at ``run_dir``; returns it. Without
    ``fingerprints``, as galleries were built before they recorded the run's per-task fingerprints."""
    run = load_run(run_dir)
    gallery = Gallery.create(
        index_dir,
        tasks=run.task_names,
        dim=run.embedding_dim,
        model_hash=run.model_hash,
        fingerprints=run.fingerprints if fingerprints else None,
    )
    try:
        items, images = [], []
        for i in range(size):
            data, labels = face(i, seed, tasks=run.task_names)
            image = Image.open(io.BytesIO(data)).convert("RGB")
            images.append(image)
            items.append(
                NewItem(f"face-{i}.png", content_hash(data), image.width, image.height, labels, data)
            )
        gallery.add(items, embed_images(run, images))
        gallery.save()
    finally:
        gallery.close()
    return index_dir


def copy_gallery(template: Path, target: Path) -> Path:
    shutil.copytree(template, target)
    (target / "writer.lock").unlink(missing_ok=True)
    return target


def stored_blob(gallery: Gallery, item: ItemRecord) -> Path | None:
    """Where a single-machine gallery keeps ``item``'s image bytes (``blobs/<2 hex>/<sha256>``), or None."""
    return gallery.metadata.blob_path(item.content_hash) if item.has_blob else None
