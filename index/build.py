"""Embedding a whole gallery under every task: read → embed → write, with per-stage timings.

- **read** (a background thread, so decoding overlaps embedding): walks the source (an image folder, or a
  dataset by name), takes each image's bytes (the file's own, or a PNG encoding for an image a dataset
  generates, see ``image_bytes``), hashes them (the content hash that deduplicates the gallery), decodes the
  image to RGB and groups images into batches. Unreadable files are skipped and listed in the report.
- **embed**: each decoded batch is preprocessed once and embedded under all tasks with
  ``model.embed_tasks`` (which moves it to the model's device): the batch is expanded over tasks inside
  the model, which computes the task-independent prefix once and the modulated stages as one mixed-task
  batch, giving (B, T, D).
- **write**: ``Gallery.insert`` (metadata rows + one vector per task); duplicates keep their first id.
  ``fill_gallery`` is this loop over any open gallery: ``build_gallery`` runs it on a new one, ``modret
  index build --metadata-url`` on the shared gallery of replicas (``index.shared_gallery``).
  Unless ``store_images=False`` (``modret index build --no-store-images``, for galleries too large to keep
  a copy of), the bytes go into the gallery's content-addressed blob folder, so that the service can serve
  them (``GET /images/{id}/content``, the web UI's thumbnails) without ever reading a path the source
  named. The gallery is saved once at the end (one durable generation).

Timings are wall-clock seconds per stage (read is measured in its own thread, so the three can sum to more
than the total when stages overlap); the service exposes them as metrics.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from index.gallery import Gallery, GalleryError
from index.metadata import NewItem, content_hash
from index.served import ServedGallery
from model.data.base import LabelValue
from model.data.folder import CSV_NAME, read_labels
from model.run import LoadedRun

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
_PREFETCH = 2  # decoded batches waiting for the model: enough to hide decoding, little memory
# Magic numbers of the formats the service serves (and accepts as uploads: ``service.runtime.images``); a
# file in any other format (TIFF) is kept as its PNG encoding so that a browser can show every gallery image.
_SERVABLE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def _servable(data: bytes) -> bool:
    return data.startswith(_SERVABLE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def image_bytes(image: Image.Image, file_data: bytes | None) -> bytes:
    """The bytes a gallery image is hashed and kept as: the file's own when it has a file in a format
    the service serves (so an upload of the same file is recognised as a duplicate), else the PNG
    encoding of ``image`` (images a dataset generates, or files in other formats)."""
    if file_data is not None and _servable(file_data):
        return file_data
    return png_bytes(image)


@dataclass(frozen=True)
class SourceImage:
    source: str  # path relative to the folder / data dir, or the dataset's synthetic id
    image: Image.Image  # RGB
    data: bytes  # encoded image (``image_bytes``): hashed, and kept as a blob unless the build says not
    labels: dict[str, LabelValue] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        return content_hash(self.data)


@dataclass
class ImageSource:
    total: int
    items: Iterator[SourceImage]
    skipped: list[str] = field(default_factory=list)  # "source: reason", filled while iterating
    labels_from: Path | None = None  # the CSV the labels came from (a folder with labels.csv)
    labelled: int = 0  # how many of the images it labels


@dataclass
class StageTimings:
    read_s: float = 0.0
    embed_s: float = 0.0
    write_s: float = 0.0
    save_s: float = 0.0


@dataclass
class BuildReport:
    images: int  # images read and embedded
    added: int  # new gallery items (images minus duplicates)
    duplicates: int
    skipped: list[str]
    tasks: list[str]
    timings: StageTimings
    wall_s: float

    @property
    def image_tasks_per_s(self) -> float:
        return self.images * len(self.tasks) / self.timings.embed_s if self.timings.embed_s else 0.0


def folder_source(directory: Path, labels_csv: Path | None = None) -> ImageSource:
    """Every image file under ``directory`` (recursively, sorted), labelled by ``labels_csv`` (default:
    ``directory/labels.csv`` when it exists; the format of ``model.data.folder``: a ``filename`` column of
    paths relative to ``directory`` and one column per attribute). Labels keep the CSV's names
    (``filter=colour:green``); files the CSV does not list have none. A malformed CSV raises
    ``DataFormatError`` (a ``ValueError``) before anything is read."""
    paths = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    csv_path = labels_csv if labels_csv is not None else directory / CSV_NAME
    by_file: dict[str, dict[str, LabelValue]] = {}
    if labels_csv is not None or csv_path.is_file():
        by_file = {PurePosixPath(k).as_posix(): v for k, v in read_labels(csv_path).items()}
    names = [path.relative_to(directory).as_posix() for path in paths]
    source = ImageSource(
        total=len(paths),
        items=iter(()),
        labels_from=csv_path if by_file else None,
        labelled=sum(1 for name in names if by_file.get(name)),
    )

    def items() -> Iterator[SourceImage]:
        for path, name in zip(paths, names, strict=True):
            try:
                data = path.read_bytes()
                with Image.open(path) as opened:
                    image = opened.convert("RGB")
            except (OSError, Image.DecompressionBombError) as e:
                source.skipped.append(f"{name}: {e}")
                continue
            yield SourceImage(name, image, image_bytes(image, data), dict(by_file.get(name, {})))

    source.items = items()
    return source


def dataset_source(
    name: str, data_dir: Path | None = None, *, image_size: int = 64, num_images: int | None = None
) -> ImageSource:
    """A dataset by name (``model.data.load_dataset``), with its known labels.

    An item's bytes (``image_bytes``) are its image file's when the dataset reads files (``sources`` are
    paths relative to ``data_dir``: CelebA, UT-Zappos50K, a labelled folder), else the PNG encoding of the
    image the dataset draws (synthfaces, whose ``sources`` are synthetic ids)."""
    from model.data import load_dataset

    dataset = load_dataset(name, data_dir, image_size=image_size, num_images=num_images)

    def items() -> Iterator[SourceImage]:
        for i, source in enumerate(dataset.sources):
            image = dataset.load_image(i).convert("RGB")
            path = data_dir / source if data_dir is not None else None
            file_data = path.read_bytes() if path is not None and path.is_file() else None
            labels = {
                t.name: t.label_value(int(v))
                for t, v in zip(dataset.tasks, dataset.labels[i], strict=True)
                if v >= 0
            }
            yield SourceImage(source, image, image_bytes(image, file_data), labels)

    return ImageSource(total=len(dataset), items=items())


@torch.inference_mode()
def embed_images(run: LoadedRun, images: list[Image.Image]) -> np.ndarray:
    """(B, T, D) float32 L2-normalised embeddings of ``images`` under every task of ``run``."""
    batch = run.preprocess.stack(images)  # (B, 3, S, S) float32 on the CPU
    return run.model.embed_tasks(batch).float().cpu().numpy()  # (B, T, D)


def _batches(
    items: Iterator[SourceImage], batch_size: int, out: queue.Queue[Any], timings: StageTimings
) -> None:
    """The read stage: fill ``out`` with lists of SourceImage, then None (or the exception raised)."""
    try:
        batch: list[SourceImage] = []
        start = time.perf_counter()
        for item in items:
            batch.append(item)
            if len(batch) == batch_size:
                timings.read_s += time.perf_counter() - start
                out.put(batch)
                batch = []
                start = time.perf_counter()
        timings.read_s += time.perf_counter() - start
        if batch:
            out.put(batch)
        out.put(None)
    except BaseException as e:  # handed to the consuming thread, which re-raises it
        out.put(e)


def build_gallery(
    run: LoadedRun,
    source: ImageSource,
    out: Path,
    *,
    backend: str = "faiss",
    store_options: dict[str, Any] | None = None,
    batch_size: int = 64,
    store_images: bool = True,
    progress: Callable[[int], None] | None = None,
) -> BuildReport:
    """Create a gallery in ``out`` holding every image of ``source`` embedded under every task; with
    ``store_images`` (the default) each image's bytes are kept in the gallery's blob folder."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; build into a new directory")
    started = time.perf_counter()
    gallery = Gallery.create(
        out,
        tasks=run.task_names,
        dim=run.embedding_dim,
        model_hash=run.model_hash,
        backend=backend,
        store_options=store_options,
        fingerprints=run.fingerprints,
    )
    try:
        report = fill_gallery(
            run, source, gallery, batch_size=batch_size, store_images=store_images, progress=progress
        )
        t0 = time.perf_counter()
        gallery.save()
        report.timings.save_s = time.perf_counter() - t0
    finally:
        gallery.close()
    report.wall_s = time.perf_counter() - started
    return report


def fill_gallery(
    run: LoadedRun,
    source: ImageSource,
    gallery: ServedGallery,
    *,
    batch_size: int = 64,
    store_images: bool = True,
    progress: Callable[[int], None] | None = None,
) -> BuildReport:
    """Add every image of ``source``, embedded under the gallery's tasks, to the open ``gallery`` (a new
    one, or the shared gallery of replicas: ``modret index build --metadata-url``); content already there
    keeps its id. Saving is the caller's."""
    lacking = [task for task in gallery.tasks if task not in run.task_names]
    if lacking:
        raise GalleryError(f"the gallery indexes {', '.join(lacking)}, which {run.run_dir} cannot embed")
    started = time.perf_counter()
    timings = StageTimings()
    positions = [run.task_names.index(task) for task in gallery.tasks]  # the gallery's task order
    batches: queue.Queue[Any] = queue.Queue(maxsize=_PREFETCH)
    reader = threading.Thread(target=_batches, args=(source.items, batch_size, batches, timings), daemon=True)
    reader.start()
    images = added = 0
    try:
        while (batch := batches.get()) is not None:
            if isinstance(batch, BaseException):
                raise batch
            t0 = time.perf_counter()
            vectors = embed_images(run, [item.image for item in batch])[:, positions]
            t1 = time.perf_counter()
            result = gallery.insert(
                [
                    NewItem(
                        item.source,
                        item.content_hash,
                        item.image.width,
                        item.image.height,
                        item.labels,
                        item.data if store_images else None,
                    )
                    for item in batch
                ],
                vectors,
            )
            added += sum(result.new)
            timings.embed_s += t1 - t0
            timings.write_s += time.perf_counter() - t1
            images += len(batch)
            if progress is not None:
                progress(len(batch))
    finally:
        reader.join(timeout=1)
    for reason in source.skipped:
        log.warning("skipped %s", reason)
    return BuildReport(
        images=images,
        added=added,
        duplicates=images - added,
        skipped=list(source.skipped),
        tasks=list(gallery.tasks),
        timings=timings,
        wall_s=time.perf_counter() - started,
    )
