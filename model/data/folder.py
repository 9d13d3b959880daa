"""A folder of the user's own images with a CSV of labels.

The CSV (``data_dir/labels.csv`` unless given) has a ``filename`` column (paths relative to
``data_dir``) and one column per attribute. A column whose values are all binary spellings — 1, true,
yes against 0, -1, false, no, any case — becomes a binary task with values ("0", "1"), unless it holds
both 0 and -1 (three numbers: categorical); any other column is categorical, its distinct values sorted
so label ids are stable. A blank cell is unknown (-1).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image

from model.data.base import UNKNOWN, AttributeDataset, DataFormatError, LabelValue, TaskSpec
from model.data.reading import (
    check_images_exist,
    encode_categorical,
    open_image,
    select_tasks,
    subsample_rows,
)

CSV_NAME: Final = "labels.csv"
FILENAME_COLUMN: Final = "filename"
_POSITIVE: Final = {"1", "true", "yes"}
_NEGATIVE: Final = {"0", "-1", "false", "no"}


def _read_csv(path: Path) -> tuple[list[str], list[str], list[list[str]]]:
    """(attribute column names, file names, per row the attribute cells, stripped)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often write a BOM
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            keys = [name.casefold() for name in header]
            if FILENAME_COLUMN not in keys:
                raise DataFormatError(f"{path}:1: no '{FILENAME_COLUMN}' column in header {header}")
            if "" in header or len(set(keys)) != len(keys):
                raise DataFormatError(f"{path}:1: blank or repeated column name in header {header}")
            name_at = keys.index(FILENAME_COLUMN)
            files: list[str] = []
            cells: list[list[str]] = []
            first_line: dict[str, int] = {}
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                where = f"{path}:{reader.line_num}"
                if len(row) != len(header):
                    raise DataFormatError(f"{where}: expected {len(header)} fields, found {len(row)}")
                row = [cell.strip() for cell in row]
                name = row.pop(name_at)
                if not name:
                    raise DataFormatError(f"{where}: blank {FILENAME_COLUMN}")
                if name in first_line:
                    raise DataFormatError(f"{where}: {name} already listed on line {first_line[name]}")
                first_line[name] = reader.line_num
                files.append(name)
                cells.append(row)
    except FileNotFoundError:
        raise DataFormatError(f"{path}: file not found") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataFormatError(f"{path}: unreadable CSV ({exc})") from exc
    return [h for i, h in enumerate(header) if i != name_at], files, cells


def _encode(name: str, column: list[str]) -> tuple[TaskSpec, np.ndarray]:
    """The task a column describes and its labels."""
    lowered = {cell.lower() for cell in column if cell}
    if lowered <= _POSITIVE | _NEGATIVE and not {"0", "-1"} <= lowered:
        binary = [int(cell.lower() in _POSITIVE) if cell else UNKNOWN for cell in column]
        return TaskSpec(name, ("0", "1")), np.array(binary, dtype=np.int64)
    values, labels = encode_categorical(column)
    return TaskSpec(name, values), labels


def read_labels(path: Path) -> dict[str, dict[str, LabelValue]]:
    """Each listed file's known labels by name, as a gallery stores them (``TaskSpec.label_value``):
    binary columns as 0/1, categorical ones by the value the CSV spells, blank cells left out. The same
    parsing and encoding as training on the folder, so a gallery's labels and a run's tasks agree."""
    columns, files, cells = _read_csv(path)
    encoded = [_encode(name, [row[c] for row in cells]) for c, name in enumerate(columns)]
    return {
        file: {spec.name: spec.label_value(int(ids[r])) for spec, ids in encoded if ids[r] != UNKNOWN}
        for r, file in enumerate(files)
    }


class ImageFolder(AttributeDataset):
    """Images under ``data_dir`` labelled by a CSV; see the module docstring."""

    def __init__(
        self,
        data_dir: Path,
        tasks: Sequence[str] | None = None,
        *,
        csv_path: Path | None = None,
        num_images: int | None = None,
        seed: int = 0,
    ) -> None:
        self.name = "folder"
        self.root = Path(data_dir)
        path = Path(csv_path) if csv_path is not None else self.root / CSV_NAME
        columns, files, cells = _read_csv(path)
        check_images_exist(self.root, files, path)
        if not files:
            raise DataFormatError(f"{path}: no image rows")
        if not columns:
            raise DataFormatError(f"{path}:1: no attribute columns besides '{FILENAME_COLUMN}'")
        chosen = select_tasks(columns, tasks, f"{self.name} ({path})")
        # Encoded over every row, before subsampling, so value ids do not depend on num_images.
        encoded = [_encode(columns[c], [row[c] for row in cells]) for c in chosen]
        rows = subsample_rows(len(files), num_images, seed)
        self.tasks = tuple(spec for spec, _ in encoded)
        self.labels = np.stack([labels for _, labels in encoded], axis=1)[rows]
        self.sources = [files[r] for r in rows]
        self.groups = None

    def load_image(self, index: int) -> Image.Image:
        return open_image(self.root / self.sources[index])
