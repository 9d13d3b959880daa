"""UT-Zappos50K with the four conditions of Conditional Similarity Networks (Veit et al., CVPR 2017).

``data_dir`` holds ``ut-zap50k-images-square/<Category>/<SubCategory>/<Brand>/<name>.jpg`` (or CSN's
``ut-zap50k-images``) and ``meta-data.csv`` (in ``data_dir`` or ``data_dir/ut-zap50k-data``), whose
``CID`` column names the image (CID ``7965307-5291`` is ``7965307.5291.jpg``). The tasks are CSN's
conditions, categorical, read from the named columns: class (Category), closure (Closure), gender
(Gender) and heel (HeelHeight); a blank cell is unknown (-1).

Without CSN's files the items are meta-data.csv's rows. With them — ``filenames.json`` (image paths,
one per line as CSN's loader reads it, or a JSON list) and ``{condition}_tripletlist_{split}.txt``
(lines ``anchor far close`` indexing filenames.json), in ``data_dir`` or ``data_dir/tripletlists`` — the
items are filenames.json's paths, an image without a meta-data row gets unknown labels, and the lists
are exposed as ``official_triplets`` (positive = close, negative = far) and define the splits.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image

from model.data.base import SPLITS, AttributeDataset, DataFormatError, Split, TaskSpec
from model.data.reading import (
    check_images_exist,
    encode_categorical,
    open_image,
    read_lines,
    select_tasks,
    subsample_rows,
)
from model.data.triplets import Triplets

CONDITIONS: Final = {"class": "Category", "closure": "Closure", "gender": "Gender", "heel": "HeelHeight"}
IMAGE_DIRS: Final = ("ut-zap50k-images-square", "ut-zap50k-images")
META_FILE: Final = "meta-data.csv"
FILENAMES_FILE: Final = "filenames.json"


def _key(name: str) -> str:
    """Join key of a CID or an image file stem: ``7965307-5291`` and ``7965307.5291`` agree."""
    return name.replace(".", "-")


def _find(data_dir: Path, name: str, subdir: str) -> Path | None:
    return next((p for p in (data_dir / name, data_dir / subdir / name) if p.is_file()), None)


def _read_meta(path: Path) -> dict[str, tuple[int, list[str]]]:
    """Per CID key: (line number, the condition columns' cells in CONDITIONS order)."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().casefold() for h in next(reader, [])]
        wanted = ["CID", *CONDITIONS.values()]
        absent = [w for w in wanted if w.casefold() not in header]
        if absent:
            raise DataFormatError(f"{path}:1: missing column(s) {', '.join(absent)}")
        at = [header.index(w.casefold()) for w in wanted]
        rows: dict[str, tuple[int, list[str]]] = {}
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                raise DataFormatError(
                    f"{path}:{reader.line_num}: expected {len(header)} fields, found {len(row)}"
                )
            cid, *cells = (row[i].strip() for i in at)
            if _key(cid) in rows:
                first = rows[_key(cid)][0]
                raise DataFormatError(f"{path}:{reader.line_num}: CID {cid} already listed on line {first}")
            rows[_key(cid)] = (reader.line_num, cells)
    return rows


def _read_filenames(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    try:
        listed = json.loads(text)
    except json.JSONDecodeError:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise DataFormatError(f"{path}: expected one image path per line or a JSON list of paths")
    return listed


def _read_triplets(path: Path, num_items: int, task: int) -> Triplets:
    """CSN's ``anchor far close`` lines."""
    rows = []
    for lineno, tokens in read_lines(path):
        if len(tokens) != 3 or not all(t.isdigit() for t in tokens):
            raise DataFormatError(f"{path}:{lineno}: expected three indices 'anchor far close'")
        row = [int(t) for t in tokens]
        if max(row) >= num_items:
            raise DataFormatError(f"{path}:{lineno}: index {max(row)} beyond the {num_items} listed images")
        rows.append(row)
    a, far, close = np.array(rows, dtype=np.int64).reshape(-1, 3).T
    return Triplets(anchor=a, positive=close, negative=far, task=np.full(len(a), task, dtype=np.int64))


def _concat(parts: list[Triplets]) -> Triplets:
    return Triplets(
        *(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Triplets))
    )


class UTZappos(AttributeDataset):
    """UT-Zappos50K from ``data_dir``; see the module docstring. ``num_images`` keeps a seeded subsample
    (and the official triplets wholly inside it)."""

    official_triplets: dict[Split, Triplets]

    def __init__(
        self,
        data_dir: Path,
        tasks: Sequence[str] | None = None,
        *,
        num_images: int | None = None,
        seed: int = 0,
    ) -> None:
        self.name = "utzappos"
        self.root = Path(data_dir)
        meta_path = _find(self.root, META_FILE, "ut-zap50k-data")
        if meta_path is None:
            raise DataFormatError(f"{self.root}: {META_FILE} not found here or in ut-zap50k-data/")
        meta = _read_meta(meta_path)
        image_dir = next((d for d in IMAGE_DIRS if (self.root / d).is_dir()), IMAGE_DIRS[0])
        filenames_path = _find(self.root, FILENAMES_FILE, "tripletlists")
        if filenames_path is None:
            paths, cells = self._from_meta(meta, image_dir, meta_path)
        else:
            paths = _read_filenames(filenames_path)
            check_images_exist(self.root / image_dir, paths, filenames_path)
            blank = [""] * len(CONDITIONS)  # an image without a meta-data row: every label unknown
            cells = [meta.get(_key(Path(p).stem), (0, blank))[1] for p in paths]

        names = list(CONDITIONS)
        chosen = select_tasks(names, tasks, self.name)
        encoded = [encode_categorical([row[c] for row in cells]) for c in chosen]
        self.tasks = tuple(TaskSpec(names[c], values) for c, (values, _) in zip(chosen, encoded, strict=True))
        labels = np.stack([codes for _, codes in encoded], axis=1)

        rows = subsample_rows(len(paths), num_images, seed)
        self.labels = labels[rows]
        self.sources = [f"{image_dir}/{paths[r]}" for r in rows]
        self.groups = None
        self.official_triplets = {}
        if filenames_path is not None:
            self._load_official(len(paths), chosen, rows)

    def _from_meta(
        self, meta: dict[str, tuple[int, list[str]]], image_dir: str, meta_path: Path
    ) -> tuple[list[str], list[list[str]]]:
        """Items = meta-data.csv's rows, each matched to its image by CID."""
        root = self.root / image_dir
        if not root.is_dir():
            raise DataFormatError(f"{self.root}: no image directory ({' or '.join(IMAGE_DIRS)})")
        found = {
            _key(Path(name).stem): f"{Path(folder).relative_to(root).as_posix()}/{name}"
            for folder, _, files in os.walk(root)
            for name in files
            if name.lower().endswith(".jpg")
        }
        missing = [key for key in meta if key not in found]
        if missing:
            raise DataFormatError(
                f"{meta_path}: no image under {root} for {len(missing)} CID(s), "
                f"first: {', '.join(missing[:5])}"
            )
        paths = [found[key].removeprefix("./") for key in meta]
        return paths, [cells for _, cells in meta.values()]

    def _load_official(self, num_items: int, chosen: list[int], rows: np.ndarray) -> None:
        names = list(CONDITIONS)
        renumber = np.full(num_items, -1, dtype=np.int64)
        renumber[rows] = np.arange(len(rows))
        for split in SPLITS:
            wanted = [f"{names[c]}_tripletlist_{split}.txt" for c in chosen]
            found = [_find(self.root, name, "tripletlists") for name in wanted]
            files = [f for f in found if f is not None]
            if not files:
                continue
            if len(files) < len(wanted):
                absent = [name for name, f in zip(wanted, found, strict=True) if f is None]
                raise DataFormatError(
                    f"{self.root}: {split} triplet lists incomplete, missing {', '.join(absent)}"
                )
            t = _concat([_read_triplets(f, num_items, k) for k, f in enumerate(files)])
            a, p, n = renumber[t.anchor], renumber[t.positive], renumber[t.negative]
            keep = (a >= 0) & (p >= 0) & (n >= 0)
            self.official_triplets[split] = Triplets(a[keep], p[keep], n[keep], t.task[keep])

    def load_image(self, index: int) -> Image.Image:
        return open_image(self.root / self.sources[index])

    def split_indices(self, split: Split, seed: int = 0) -> np.ndarray:
        """With CSN's lists, the images their ``split`` triplets use; else a seeded random split."""
        if not self.official_triplets:
            return super().split_indices(split, seed)
        t = self.official_triplets.get(split)
        if t is None:
            return np.zeros(0, dtype=np.int64)
        return np.unique(np.concatenate([t.anchor, t.positive, t.negative]))
