"""A gallery and a run whose tasks changed: which of the gallery's task indices the run can still serve,
the gallery's stored images embedded under a new task only, and the task changes themselves.

A gallery built under task ``t`` stays valid for any run that embeds ``t`` bit for bit as the run it was
built with. ``model.tasks.fingerprints`` names exactly that (one digest per task, covering the shared
weights and the task's own rows), so a gallery that records the per-task fingerprints it was built
under (gallery.json ``fingerprints``) can accept a child run (``modret task add``/``remove``) for its old
tasks, ask for an index of each new one, and still refuse a different model. ``check_run`` makes that
decision from the recorded digests and ``check_model`` applies it when a gallery opens (a gallery
without fingerprints needs the exact model hash). ``embed_stored`` and ``stored_batches`` produce a new
task's vectors from the images the gallery kept (or, for items whose bytes were not kept, from the
original files, found by content hash); ``add_task``/``remove_task`` (``Gallery.add_task``,
``modret index add-task``/``remove-task``) change a gallery's task list through ``Gallery.change_tasks``.
``add_task`` embeds while the gallery still takes writes (a service serving it indexes a task that way) and
settles the items added or removed meanwhile with writes paused, so the new index holds exactly the
gallery's items.

A gallery without fingerprints (built before they were recorded) gets them on its first task change when
the run is the one it was built with or descends from it (its lineage names that model hash): a child's
old tasks embed bit for bit as its parent's (``modret task add`` checks it).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from index.gallery_files import GalleryError, refused_write
from index.metadata import Metadata
from model.run import LoadedRun
from model.tasks import Fingerprints

if TYPE_CHECKING:
    from index.gallery import Gallery

BATCH = 64


class ImagesNotStoredError(LookupError):
    """Gallery items whose image bytes were not kept (nor given), so they cannot be embedded anew."""

    def __init__(self, missing: int, total: int, first: list[int], given: int | None = None) -> None:
        self.missing, self.total, self.first = missing, total, first
        if given is None:
            what = "were not stored (built with --no-store-images"
            fix = "pass the original images with --images DIR to embed them under the new task"
        else:
            what = f"were not stored nor among the {given} images given (matched by content hash"
            fix = "pass the folder the gallery was built from (the same files, unchanged)"
        super().__init__(f"{missing} of {total} gallery images {what}; first ids {first}): {fix}")


@dataclass(frozen=True)
class TaskCheck:
    """How a run relates to a gallery's per-task indices."""

    valid: list[str]  # indexed tasks the run embeds exactly as when they were indexed
    missing: list[str]  # run tasks the gallery has no index for: each needs ``index add-task``
    changed: list[str]  # indexed tasks the run embeds differently: their vectors are stale
    dropped: list[str]  # indexed tasks the run no longer has (searchable no more; harmless)
    shared_matches: bool

    @property
    def problem(self) -> str | None:
        """Why the run must not serve this gallery (None: it may, for ``valid``)."""
        if not self.shared_matches:
            return "the run's shared weights are not the ones the gallery was built with: rebuild the index"
        if self.changed:
            return (
                f"the run embeds task(s) {', '.join(self.changed)} differently from when they were indexed: "
                "rebuild the index, or serve the run the gallery was built with"
            )
        return None


def check_run(shared: str, tasks: Mapping[str, str], run: Fingerprints) -> TaskCheck:
    """Compare a gallery's recorded fingerprints (``shared``, ``tasks[name]``) with a run's."""
    return TaskCheck(
        valid=[t for t, digest in tasks.items() if run.tasks.get(t) == digest],
        missing=[t for t in run.tasks if t not in tasks],
        changed=[t for t, digest in tasks.items() if t in run.tasks and run.tasks[t] != digest],
        dropped=[t for t in tasks if t not in run.tasks],
        shared_matches=shared == run.shared,
    )


def stored_batches(
    metadata: Metadata,
    batch: int = BATCH,
    images: Mapping[str, Path] | None = None,
    ids: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, list[Image.Image]]]:
    """The gallery's items (or those of ``ids``) in id order as (ids, decoded RGB images) batches, from
    their stored bytes or, for items without, from ``images[content_hash]`` (a file).

    Raises ``ImagesNotStoredError`` before yielding anything when any item has neither.
    """
    ids = np.sort(metadata.ids() if ids is None else np.asarray(ids, dtype=np.int64))
    records = metadata.get(ids)
    given = images or {}
    missing = [
        int(i) for i in ids if not records[int(i)].has_blob and records[int(i)].content_hash not in given
    ]
    if missing:
        raise ImagesNotStoredError(
            len(missing), len(ids), missing[:5], None if images is None else len(given)
        )
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        decoded = []
        for i in chunk:
            record = records[int(i)]
            path = given.get(record.content_hash) if not record.has_blob else None
            data = (path or metadata.blob_path(record.content_hash)).read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                decoded.append(image.convert("RGB"))
        yield chunk, decoded


@torch.no_grad()
def embed_stored(
    run: LoadedRun, task: str, batches: Iterator[tuple[np.ndarray, list[Image.Image]]]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, (b, D) float32 vectors) of each batch under ``task`` only: one modulated pass per image."""
    if task not in run.task_names:
        raise KeyError(f"task {task} is not in the run (its tasks: {', '.join(run.task_names)})")
    position = run.task_names.index(task)
    for ids, images in batches:
        vectors = run.model.embed_tasks(run.preprocess.stack(images), [position])  # (b, 1, D)
        yield ids, vectors[:, 0].float().cpu().numpy()


def recorded_fingerprints(config: Mapping[str, Any]) -> Fingerprints | None:
    """The fingerprints a gallery's config records for its tasks, None for a gallery without."""
    recorded = config.get("fingerprints")
    if not isinstance(recorded, dict):
        return None
    return Fingerprints(str(recorded["shared"]), {str(t): str(d) for t, d in recorded["tasks"].items()})


def check_model(
    root: Path, config: Mapping[str, Any], model_hash: str | None, run: Fingerprints | None
) -> TaskCheck | None:
    """Whether a run may open the gallery (``GalleryError`` saying why not); None when not asked."""
    recorded = recorded_fingerprints(config)
    if recorded is not None and run is not None:
        check = check_run(recorded.shared, recorded.tasks, run)
        if check.problem is not None:
            raise GalleryError(f"{root}: {check.problem}")
        return check
    if model_hash is not None and model_hash != config["model_hash"]:
        raise GalleryError(
            f"{root} was built with model {config['model_hash'][:12]}…, the run's model is "
            f"{model_hash[:12]}…; rebuild the index with this run"
        )
    if run is None or model_hash is None:
        return None
    tasks = list(config["tasks"])  # same model: every task valid
    return TaskCheck(
        [t for t in tasks if t in run.tasks], [t for t in run.tasks if t not in tasks], [], [], True
    )


def _fingerprints_for(gallery: Gallery, run: LoadedRun) -> Fingerprints:
    """The gallery's recorded fingerprints, or (a gallery without) the run's for its tasks when the run is
    the one it was built with or descends from it."""
    recorded = recorded_fingerprints(gallery.config)
    if recorded is not None:
        return recorded
    ancestors = {run.model_hash, *(entry.get("parent_model_hash") for entry in run.lineage)}
    if gallery.model_hash not in ancestors:
        raise GalleryError(
            f"{gallery.root} records no per-task fingerprints and was built with model "
            f"{gallery.model_hash[:12]}…, which is neither {run.run_dir}'s nor one of its parents': "
            "rebuild the index with this run"
        )
    own = run.fingerprints
    return Fingerprints(own.shared, {t: own.tasks.get(t, "") for t in gallery.tasks})


def add_task(
    gallery: Gallery,
    task: str,
    run: LoadedRun,
    *,
    images: Mapping[str, Path] | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Embed every item of ``gallery`` under the run's ``task`` only and add the task's index durably
    (``Gallery.change_tasks``); returns how many items were embedded."""
    if task in gallery.tasks:
        raise GalleryError(
            f"{gallery.root} already indexes {task}; to index it anew, remove it first "
            f"(modret index remove-task --index {gallery.root} --task {task})"
        )
    if task not in run.task_names:
        raise GalleryError(f"task {task} is not in {run.run_dir} (its tasks: {', '.join(run.task_names)})")
    recorded = _fingerprints_for(gallery, run)
    check = check_run(recorded.shared, recorded.tasks, run.fingerprints)
    if check.problem is not None:
        raise GalleryError(f"{gallery.root}: {check.problem}")
    # Embedded while the gallery takes writes (a service may be serving it: ``POST /admin/tasks/{task}/
    # index``); what was added or removed meanwhile is settled below with writes paused.
    embedded = _embed(run, task, stored_batches(gallery.metadata, images=images), progress)
    fingerprints = {
        "shared": recorded.shared,
        "tasks": {**recorded.tasks, task: run.fingerprints.tasks[task]},
    }
    config = {**gallery.config, "tasks": [*gallery.tasks, task], "fingerprints": fingerprints}
    added: list[int] = []

    def change() -> None:  # writes paused: the item list cannot move under us now
        current = gallery.metadata.ids()
        ids, vectors = embedded
        kept = np.isin(ids, current)  # drops items removed since they were embedded
        late = np.setdiff1d(current, ids)  # items added since the embedding started
        late_ids, late_vectors = _embed(run, task, stored_batches(gallery.metadata, images=images, ids=late))
        ids = np.concatenate([ids[kept], late_ids])
        vectors = np.concatenate([vectors[kept], late_vectors])
        gallery.store.add_task(task, ids, vectors)
        added.append(len(ids))

    def undo() -> None:
        if added:  # the store holds the new index: take it out again
            gallery.store.remove_task(task)
            gallery.store.discard_removed()

    _change_tasks(gallery, config, change, undo)
    return added[0]


def _embed(
    run: LoadedRun,
    task: str,
    batches: Iterator[tuple[np.ndarray, list[Image.Image]]],
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every batch's ids and vectors under ``task``, concatenated: ((N,) int64, (N, D) float32)."""
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for ids, vectors in embed_stored(run, task, batches):
        parts.append((ids, vectors))
        if progress is not None:
            progress(len(ids))
    if not parts:
        return np.empty(0, dtype=np.int64), np.empty((0, run.embedding_dim), dtype=np.float32)
    return np.concatenate([i for i, _ in parts]), np.concatenate([v for _, v in parts])


def remove_task(gallery: Gallery, task: str) -> None:
    """Drop ``task``'s index from ``gallery`` durably (``Gallery.change_tasks``); the last task stays."""
    if task not in gallery.tasks:
        raise GalleryError(f"{gallery.root} has no index for {task} (its tasks: {', '.join(gallery.tasks)})")
    if len(gallery.tasks) == 1:
        raise GalleryError(f"{task} is the only task of {gallery.root}: a gallery keeps at least one")
    config: dict[str, Any] = {**gallery.config, "tasks": [t for t in gallery.tasks if t != task]}
    recorded = recorded_fingerprints(gallery.config)
    if recorded is not None:
        kept = {t: d for t, d in recorded.tasks.items() if t != task}
        config["fingerprints"] = {"shared": recorded.shared, "tasks": kept}

    _change_tasks(
        gallery, config, lambda: gallery.store.remove_task(task), lambda: gallery.store.restore_task(task)
    )


def _change_tasks(
    gallery: Gallery, config: dict[str, Any], change: Callable[[], None], undo: Callable[[], None]
) -> None:
    """``Gallery.change_tasks``; a change that could not be written was undone (the gallery is as before)
    and is raised as ``StorageFull`` when the disk had no room, else as ``GalleryError``."""
    try:
        gallery.change_tasks(config, change, undo)
    except GalleryError:
        raise
    except Exception as e:
        message = f"{gallery.root}: the task change could not be written ({e!r}); it was undone"
        raise refused_write(gallery.root, e, message) from e
