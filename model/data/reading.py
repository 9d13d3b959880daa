"""What every loader does the same way: read a whitespace table with line numbers, check that listed
images exist, open an image, encode a categorical column, pick tasks by name and rows by a seeded
subsample — each failing with a ``DataFormatError`` that names the file (and line)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from model.data.base import UNKNOWN, DataFormatError


def read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number, whitespace-separated tokens) of each non-blank line; tolerates CRLF,
    runs of spaces and trailing blank lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: unreadable ({exc})") from exc
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def check_images_exist(root: Path, names: Iterable[str], listed_in: Path) -> None:
    """Fail naming the first few of ``names`` (paths relative to ``root``) that are not files."""
    if not root.is_dir():
        raise DataFormatError(f"{root}: image directory not found (images are listed in {listed_in})")
    present: dict[str, set[str]] = {}  # one listdir per directory instead of one stat per image

    def exists(name: str) -> bool:
        folder, _, base = name.rpartition("/")
        if folder not in present:
            try:
                present[folder] = set(os.listdir(root / folder))
            except OSError:
                present[folder] = set()
        return base in present[folder]

    missing = [name for name in names if not exists(name)]
    if missing:
        shown = ", ".join(missing[:5])
        raise DataFormatError(
            f"{listed_in}: {len(missing)} listed image(s) missing under {root}, first: {shown}"
        )


def open_image(path: Path) -> Image.Image:
    """The image at ``path`` in RGB mode."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path}: unreadable image ({exc})") from exc


def encode_categorical(cells: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """(sorted distinct non-blank values, per cell its value's index or UNKNOWN when blank)."""
    values = tuple(sorted({cell for cell in cells if cell}))
    code = {value: i for i, value in enumerate(values)}
    return values, np.array([code.get(cell, UNKNOWN) for cell in cells], dtype=np.int64)


def select_tasks(available: Sequence[str], requested: Sequence[str] | None, dataset: str) -> list[int]:
    """Indices into ``available`` of the ``requested`` task names, matched case-insensitively, in the
    requested order; all of them when ``requested`` is None."""
    if requested is None:
        return list(range(len(available)))
    by_key = {name.casefold(): i for i, name in enumerate(available)}
    unknown = [name for name in requested if name.casefold() not in by_key]
    if unknown:
        raise DataFormatError(
            f"{dataset}: unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(available)}"
        )
    chosen = [by_key[name.casefold()] for name in requested]
    if len(set(chosen)) != len(chosen):
        raise DataFormatError(f"{dataset}: a task is listed twice in {list(requested)}")
    return chosen


def subsample_rows(n: int, num_images: int | None, seed: int) -> np.ndarray:
    """Sorted row indices: all ``n`` rows, or a seeded random ``num_images`` of them."""
    if num_images is None or num_images >= n:
        return np.arange(n)
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    return np.sort(np.random.default_rng(seed).choice(n, size=num_images, replace=False))
