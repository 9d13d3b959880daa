"""The dataset contract every loader fulfils, and identity-aware train/val/test splits.

A dataset is a list of images with one integer label per task. Tasks are attributes (CelebA's
``Smiling``) or categorical conditions (UT-Zappos50K's ``closure``); a label is an index into the
task's ``values``; ``-1`` marks an item whose value for that task is unknown (never used in triplets).

Outside training a label is shown and stored by its *name* (``label_value``): the value as the dataset
spells it, an ``int`` when that spelling is an integer (binary attributes are 0/1), else the string
(``"green"``), so that a gallery filters and shows a user's own categories as they wrote them.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
UNKNOWN = -1
MAX_LABEL_TEXT = 200  # longest label name or value a gallery keeps

LabelValue = int | str  # a label as a gallery stores and shows it: see ``label_value``
_INTEGER = re.compile(r"[+-]?[0-9]+")


def as_label_value(value: str | int | np.integer) -> LabelValue:
    """A label value from its spelling: an integer when it spells one (``"1"``, ``" -3"``), else the
    stripped text; integers (numpy's too) as plain ``int``. The one normalisation every writer and every
    filter applies, so ``1`` and ``"1"`` never name two different values."""
    if not isinstance(value, str):
        return int(value)
    text = value.strip()
    # ASCII digits only: int() would also read "1_000" and "１" (fullwidth), which are names here
    return int(text) if _INTEGER.fullmatch(text) else text


def label_problem(value: object) -> str | None:
    """Why ``value`` cannot be a stored label value (None: it can): an integer within 64 bits, or a
    non-empty printable text of at most ``MAX_LABEL_TEXT`` characters."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return "a label value is an integer or a text"
    if isinstance(value, int):
        return None if -(2**63) <= value < 2**63 else "an integer label value must fit in 64 bits"
    if not value:
        return "a label value must not be empty"
    if len(value) > MAX_LABEL_TEXT:
        return f"a label value is at most {MAX_LABEL_TEXT} characters"
    if not value.isprintable():
        return "a label value must not contain control characters"
    return None


class DataFormatError(ValueError):
    """Malformed dataset input; the message names the file, the line when there is one, and the problem."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    values: tuple[str, ...]  # label i means values[i]; binary attributes use ("0", "1")

    @property
    def num_values(self) -> int:
        return len(self.values)

    def label_value(self, label: int) -> LabelValue:
        """The name of label id ``label`` (an index into ``values``), as a gallery stores it."""
        return as_label_value(self.values[label])


class AttributeDataset(abc.ABC):
    """Images with per-task integer labels; see the module docstring."""

    name: str
    tasks: tuple[TaskSpec, ...]
    labels: np.ndarray  # (N, T) int64
    sources: list[str]  # per item: the file name relative to the data dir, or a synthetic id
    groups: np.ndarray | None  # (N,) identity per item for identity-disjoint splits, or None

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @abc.abstractmethod
    def load_image(self, index: int) -> Image.Image:
        """The item's image in RGB mode; raises DataFormatError naming the file if it is unreadable."""

    def split_indices(self, split: Split, seed: int = 0) -> np.ndarray:
        """Indices of ``split``; identity-disjoint when ``groups`` is set. Loaders with an official
        partition override this."""
        return make_splits(len(self), self.groups, seed)[split]


def make_splits(
    n: int,
    groups: np.ndarray | None,
    seed: int,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[Split, np.ndarray]:
    """Seeded random split of ``n`` items; items sharing a group land in the same split."""
    rng = np.random.default_rng(seed)
    keys = np.arange(n) if groups is None else np.asarray(groups)
    unique = np.unique(keys)
    rng.shuffle(unique)
    cut1 = round(len(unique) * fractions[0])
    cut2 = cut1 + round(len(unique) * fractions[1])
    assign = {"train": unique[:cut1], "val": unique[cut1:cut2], "test": unique[cut2:]}
    return {s: np.sort(np.flatnonzero(np.isin(keys, assign[s]))) for s in SPLITS}
