"""CelebA in its own on-disk layout.

``data_dir`` holds ``img_align_celeba/NNNNNN.jpg`` and ``list_attr_celeba.txt`` (line 1 a row count,
ignored because cut-down copies often leave it stale; line 2 the attribute names; then ``NNNNNN.jpg``
and one value in {-1, 1} per attribute), optionally ``list_eval_partition.txt`` (``NNNNNN.jpg 0|1|2``
for train/val/test, used as the split when present) and ``identity_CelebA.txt`` (``NNNNNN.jpg id``, for
identity-disjoint splits otherwise). Attributes become binary tasks with values ("0", "1").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image

from model.data.base import AttributeDataset, DataFormatError, Split, TaskSpec
from model.data.reading import check_images_exist, open_image, read_lines, select_tasks, subsample_rows

IMAGE_DIR: Final = "img_align_celeba"
ATTR_FILE: Final = "list_attr_celeba.txt"
PARTITION_FILE: Final = "list_eval_partition.txt"
IDENTITY_FILE: Final = "identity_CelebA.txt"

ATTRIBUTES: Final = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip
# The official code's seven evaluation attributes, and the paper's 40-attribute setting minus the one
# attribute (Blurry) that describes the photo rather than the face.
OFFICIAL_7: Final = (
    "Smiling",
    "Oval_Face",
    "5_o_Clock_Shadow",
    "Bald",
    "Arched_Eyebrows",
    "Big_Lips",
    "Big_Nose",
)
ALL_BUT_BLURRY: Final = tuple(a for a in ATTRIBUTES if a != "Blurry")
_SPLIT_CODES: Final[dict[Split, int]] = {"train": 0, "val": 1, "test": 2}


def _read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(attribute names, image names, (N, A) labels in {0, 1})."""
    lines = read_lines(path)
    # Line 1 is a row count that cut-down copies leave stale: skip it whatever it says, unless the file
    # starts directly with the (many-name) header.
    if lines and len(lines[0][1]) == 1:
        lines = lines[1:]
    if not lines:
        raise DataFormatError(f"{path}: no attribute-name line")
    names = lines[0][1]
    images: list[str] = []
    rows: list[list[bool]] = []
    first_line: dict[str, int] = {}
    for lineno, tokens in lines[1:]:
        image, values = tokens[0], tokens[1:]
        if len(values) != len(names):
            raise DataFormatError(
                f"{path}:{lineno}: expected {len(names)} values after {image}, found {len(values)}"
            )
        if not {"-1", "1"}.issuperset(values):
            bad = next(i for i, v in enumerate(values) if v not in ("-1", "1"))
            raise DataFormatError(f"{path}:{lineno}: {names[bad]} is {values[bad]!r}, expected -1 or 1")
        if image in first_line:
            raise DataFormatError(f"{path}:{lineno}: {image} already listed on line {first_line[image]}")
        first_line[image] = lineno
        images.append(image)
        rows.append([v == "1" for v in values])
    if not images:
        raise DataFormatError(f"{path}: no image rows")
    return names, images, np.array(rows, dtype=np.int64)


def _read_per_image(path: Path, images: list[str], what: str, allowed: set[str] | None = None) -> np.ndarray:
    """The integer after each of ``images`` in a ``NNNNNN.jpg value`` file."""
    found: dict[str, int] = {}
    for lineno, tokens in read_lines(path):
        if len(tokens) != 2 or not tokens[1].isdigit() or (allowed is not None and tokens[1] not in allowed):
            expected = what if allowed is None else "|".join(sorted(allowed))
            raise DataFormatError(
                f"{path}:{lineno}: expected '<image> <{expected}>', found {' '.join(tokens)!r}"
            )
        found[tokens[0]] = int(tokens[1])
    missing = [image for image in images if image not in found]
    if missing:
        raise DataFormatError(
            f"{path}: no {what} for {len(missing)} image(s), first: {', '.join(missing[:5])}"
        )
    return np.array([found[image] for image in images], dtype=np.int64)


class CelebA(AttributeDataset):
    """CelebA from ``data_dir``; see the module docstring. ``num_images`` keeps a seeded subsample."""

    def __init__(
        self,
        data_dir: Path,
        tasks: Sequence[str] | None = None,
        *,
        num_images: int | None = None,
        seed: int = 0,
    ) -> None:
        self.name = "celeba"
        self.root = Path(data_dir)
        attr_path = self.root / ATTR_FILE
        names, images, labels = _read_attributes(attr_path)
        check_images_exist(self.root / IMAGE_DIR, images, attr_path)
        chosen = select_tasks(names, tasks, self.name)
        self.tasks = tuple(TaskSpec(names[i], ("0", "1")) for i in chosen)

        partition_path, identity_path = self.root / PARTITION_FILE, self.root / IDENTITY_FILE
        codes = {str(code) for code in _SPLIT_CODES.values()}
        partition = (
            _read_per_image(partition_path, images, "partition", codes) if partition_path.exists() else None
        )
        groups = _read_per_image(identity_path, images, "identity") if identity_path.exists() else None

        rows = subsample_rows(len(images), num_images, seed)
        self.labels = labels[rows][:, chosen]
        self.sources = [f"{IMAGE_DIR}/{images[r]}" for r in rows]
        self.groups = None if groups is None else groups[rows]
        self.partition = None if partition is None else partition[rows]

    def load_image(self, index: int) -> Image.Image:
        return open_image(self.root / self.sources[index])

    def split_indices(self, split: Split, seed: int = 0) -> np.ndarray:
        """The official partition when ``list_eval_partition.txt`` exists (``seed`` unused), else a
        seeded split, identity-disjoint when ``identity_CelebA.txt`` exists."""
        if self.partition is None:
            return super().split_indices(split, seed)
        return np.flatnonzero(self.partition == _SPLIT_CODES[split])
