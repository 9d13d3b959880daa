"""A gallery and a run whose tasks changed: which of the gallery's task indices the run can still serve,
and the gallery's stored images embedded under a new task only.

A gallery built under task ``t`` stays valid for any run that embeds ``t`` bit for bit as the run it was
built with. ``model.tasks.fingerprints`` names exactly that (one digest per task, covering the shared
weights and the task's own rows), so a gallery that records the per-task fingerprints it was built
under can accept a child run (``modret task add``/``remove``) for its old tasks, ask for an index of each
new one, and still refuse a different model. ``check_run`` makes that decision from the recorded digests;
``embed_stored`` and ``stored_batches`` produce the new task's vectors from the images the gallery kept.

Not wired yet: the gallery does not record per-task fingerprints and its stores have no way to add a task
to an existing gallery; ``modret index add-task`` will drive these functions once they do.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from index.metadata import Metadata
from model.run import LoadedRun
from model.tasks import Fingerprints

BATCH = 64


class ImagesNotStoredError(LookupError):
    """Gallery items whose image bytes were not kept, so they cannot be embedded under a new task."""

    def __init__(self, missing: int, total: int, first: list[int]) -> None:
        self.missing, self.total, self.first = missing, total, first
        super().__init__(
            f"{missing} of {total} gallery images were not stored (built with --no-store-images; first ids "
            f"{first}): pass the original images with --images DIR to embed them under the new task"
        )


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


def stored_batches(metadata: Metadata, batch: int = BATCH) -> Iterator[tuple[np.ndarray, list[Image.Image]]]:
    """The gallery's items in id order as (ids, decoded RGB images) batches, from their stored bytes.

    Raises ``ImagesNotStoredError`` before yielding anything when any item has no stored bytes.
    """
    ids = np.sort(metadata.ids())
    records = metadata.get(ids)
    missing = [int(i) for i in ids if not records[int(i)].has_blob]
    if missing:
        raise ImagesNotStoredError(len(missing), len(ids), missing[:5])
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        images = []
        for i in chunk:
            path = metadata.blob_path(records[int(i)].content_hash)
            with Image.open(io.BytesIO(path.read_bytes())) as image:
                images.append(image.convert("RGB"))
        yield chunk, images


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
