"""The dataset contract every loader fulfils, and identity-aware train/val/test splits.

A dataset is a list of images with one integer label per task. Tasks are attributes (CelebA's
``Smiling``) or categorical conditions (UT-Zappos50K's ``closure``); a label is an index into the
task's ``values``; ``-1`` marks an item whose value for that task is unknown (never used in triplets).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
UNKNOWN = -1


class DataFormatError(ValueError):
    """Malformed dataset input; the message names the file, the line when there is one, and the problem."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    values: tuple[str, ...]  # label i means values[i]; binary attributes use ("0", "1")

    @property
    def num_values(self) -> int:
        return len(self.values)


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
