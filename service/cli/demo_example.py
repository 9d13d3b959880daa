"""The demo's example query: a face from a family the gallery does not hold, checked before it is printed.

The banner's ``curl`` must show the product working. So before printing anything the demo searches its
gallery with candidate faces, in-process and by the server's own path (the bytes decoded and resized by
``service.runtime.embedding.prepare``, embedded by ``embed_tasks``, ranked by the gallery's search), and
prints only a (face, task) whose top 5 all share the face's value of that task, preferring ``Smiling``
(the README's example) and then the tasks the model serves best (test precision@10 in metrics.json). A
second task whose top 5 also all agree with the face, and that are other images, shows the point of the
product: the same image, another attribute, another answer. With no candidate that passes, the banner says
so instead of printing a search that fails. The face's labels are written beside it as ``example.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from index.build import png_bytes
from index.gallery import Gallery
from index.store import PAD_ID
from model.data.synthfaces import render_face
from model.durable import atomic_write, atomic_write_text
from model.run import METRICS, LoadedRun
from service.runtime.embedding import prepare

# The family the example is drawn from: not the gallery's (seed 0), so the example is a new face.
EXAMPLE_SEED = 1
EXAMPLE_SIZE = 128
CANDIDATES = 32  # faces tried, in order
TOP_K = 5  # the printed curl's k: every one of them must share the queried attribute
FIRST_CHOICE = "Smiling"


@dataclass(frozen=True)
class Query:
    task: str
    value: int  # the example's label under ``task``, which every hit shares
    ids: tuple[int, ...]  # the top ``TOP_K`` gallery ids


@dataclass(frozen=True)
class Example:
    index: int  # the face's index in the ``EXAMPLE_SEED`` family
    labels: dict[str, int]  # under the model's tasks
    queries: tuple[Query, ...]  # the checked searches: one, or two under different tasks
    image: Image.Image


def task_order(run: LoadedRun) -> list[str]:
    """``FIRST_CHOICE`` first, then the tasks by their test precision@10, best first (unknown last)."""
    try:
        tasks = json.loads((run.run_dir / METRICS).read_text())["test"]["tasks"]
        score = {name: float(tasks[name]["precision_at_10"]) for name in run.task_names}
    except (OSError, ValueError, KeyError, TypeError):
        score = {}
    return sorted(run.task_names, key=lambda t: (t != FIRST_CHOICE, -score.get(t, -1.0)))


def find_example(run: LoadedRun, gallery: Gallery, max_pixels: int) -> Example | None:
    """The first candidate face and task (in ``task_order``) whose top ``TOP_K`` all share the face's
    value of the task, with a second such task giving other images when one exists; None if no
    candidate passes."""
    faces = [render_face(EXAMPLE_SEED, i, EXAMPLE_SIZE) for i in range(CANDIDATES)]
    pixels = prepare([png_bytes(image) for image, _ in faces], max_pixels, None, run.preprocess).pixels
    with torch.inference_mode():
        vectors = run.model.embed_tasks(run.preprocess.normalize(pixels)).float().cpu().numpy()  # (C, T, D)
    tasks = run.task_names
    top = {
        task: gallery.search(task, np.ascontiguousarray(vectors[:, t]), TOP_K).ids
        for t, task in enumerate(tasks)
    }  # task -> (C, TOP_K) ids
    found = np.unique(np.concatenate([ids.ravel() for ids in top.values()]))
    records = gallery.items([int(i) for i in found if i != PAD_ID])

    def query(c: int, task: str) -> Query | None:
        value = faces[c][1][task]
        ids = tuple(int(i) for i in top[task][c])
        agree = all(i in records and str(records[i].labels.get(task)) == str(value) for i in ids)
        return Query(task, value, ids) if agree and len(ids) == TOP_K else None

    order = task_order(run)
    fallback: Example | None = None
    for task in order:
        for c in range(CANDIDATES):
            first = query(c, task)
            if first is None:
                continue
            labels = {name: faces[c][1][name] for name in tasks}
            seconds = (query(c, other) for other in order if other != task)
            second = next((q for q in seconds if q is not None and set(q.ids) != set(first.ids)), None)
            if second is not None:
                return Example(c, labels, (first, second), faces[c][0])
            fallback = fallback or Example(c, labels, (first,), faces[c][0])
    return fallback


def write_example(example: Example, image_path: Path) -> Path:
    """The face as ``image_path`` (PNG) and its labels and checked queries beside it (``.json``)."""
    atomic_write(image_path, lambda tmp: example.image.save(tmp, "PNG"))
    record: dict[str, Any] = {
        "labels": example.labels,
        "queries": [{k: v for k, v in asdict(q).items() if k != "ids"} for q in example.queries],
        "face": {"family_seed": EXAMPLE_SEED, "index": example.index, "size": EXAMPLE_SIZE},
    }
    labels_path = image_path.with_suffix(".json")
    atomic_write_text(labels_path, json.dumps(record, indent=2) + "\n")
    return labels_path
