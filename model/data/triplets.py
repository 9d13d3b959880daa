"""Balanced, seeded triplet sampling: every batch holds ``per_task`` triplets for every task.

For task ``t`` a triplet is (anchor, positive, negative) where anchor and positive share ``t``'s value
and the negative has another known value; unknown labels (``-1``) are never used. The anchor's value is
drawn uniformly among the values held by at least two items, so rare attribute values are seen as often
as common ones; the negative is drawn uniformly among all items with a different known value.

All sampling is vectorised over the whole batch. Per task, the usable items are laid out in one pool
sorted by value, so each (task, value) group is a contiguous slice and "any item of another value" is a
uniform draw from the task's slice with the anchor's group skipped over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.data.base import UNKNOWN


@dataclass(frozen=True)
class Triplets:
    anchor: np.ndarray  # (M,) int64 dataset indices
    positive: np.ndarray  # (M,) int64
    negative: np.ndarray  # (M,) int64
    task: np.ndarray  # (M,) int64 task index (column of labels)

    def __len__(self) -> int:
        return len(self.anchor)


class TripletSampler:
    """Draws balanced triplet batches over ``indices`` (the items of one split) of ``labels`` (N, T)."""

    def __init__(
        self,
        labels: np.ndarray,
        indices: np.ndarray,
        per_task: int = 8,
        seed: int = 0,
        tasks: Sequence[int] | None = None,
    ) -> None:
        if per_task < 1:
            raise ValueError(f"per_task must be positive, got {per_task}")
        labels = np.asarray(labels)
        indices = np.asarray(indices, dtype=np.int64)
        self.tasks = np.arange(labels.shape[1]) if tasks is None else np.asarray(tasks, dtype=np.int64)
        self.per_task = per_task
        self._rng = np.random.default_rng(seed)

        pools, group_starts, group_sizes, group_tasks = [], [], [], []
        self._task_start = np.zeros(len(self.tasks), dtype=np.int64)
        self._task_size = np.zeros(len(self.tasks), dtype=np.int64)
        offset = 0
        for k, t in enumerate(self.tasks):
            column = labels[indices, t]
            known = column != UNKNOWN
            order = np.argsort(column[known], kind="stable")
            values, sizes = np.unique(column[known][order], return_counts=True)
            if len(values) < 2 or sizes.max() < 2:
                raise ValueError(
                    f"task {t}: triplets need two known values, one of them held by 2+ items; the given "
                    f"items hold values {values.tolist()} with counts {sizes.tolist()}"
                )
            pools.append(indices[known][order])
            starts = offset + np.concatenate([[0], np.cumsum(sizes)[:-1]])
            group_starts.append(starts)
            group_sizes.append(sizes)
            group_tasks.append(np.full(len(sizes), k))
            self._task_start[k], self._task_size[k] = offset, sizes.sum()
            offset += sizes.sum()
        self._pool = np.concatenate(pools)
        starts, sizes, owners = map(np.concatenate, (group_starts, group_sizes, group_tasks))
        # Anchor groups: those with 2+ items, listed task by task so each task's choices are one slice.
        eligible = np.flatnonzero(sizes >= 2)
        self._anchor_group = eligible
        self._eligible_start = np.searchsorted(owners[eligible], np.arange(len(self.tasks)))
        self._eligible_count = np.bincount(owners[eligible], minlength=len(self.tasks))
        self._group_start, self._group_size = starts, sizes

    def sample(self) -> Triplets:
        """One batch: ``per_task`` triplets for every task, task-major."""
        slot = np.repeat(np.arange(len(self.tasks)), self.per_task)
        draw = self._rng.integers  # with an array of upper bounds: one exact uniform draw per slot
        group = self._anchor_group[self._eligible_start[slot] + draw(self._eligible_count[slot])]
        start, size = self._group_start[group], self._group_size[group]

        anchor = draw(size)
        positive = draw(size - 1)
        positive += positive >= anchor  # skip the anchor itself

        negative = self._task_start[slot] + draw(self._task_size[slot] - size)
        negative += np.where(negative >= start, size, 0)  # skip the anchor's group
        return Triplets(
            anchor=self._pool[start + anchor],
            positive=self._pool[start + positive],
            negative=self._pool[negative],
            task=self.tasks[slot].astype(np.int64),
        )


def fixed_triplets(
    labels: np.ndarray,
    indices: np.ndarray,
    per_task: int,
    seed: int,
    tasks: Sequence[int] | None = None,
) -> Triplets:
    """A reproducible evaluation set: one ``per_task`` batch from a sampler seeded with ``seed``."""
    return TripletSampler(labels, indices, per_task=per_task, seed=seed, tasks=tasks).sample()
