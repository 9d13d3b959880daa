"""The write protocol of replicas that share one metadata database and one vector store (#14).

Several modret processes write one gallery at once: the metadata is a ``SharedMetadataStore``
(PostgreSQL), the vectors a store every replica reaches (a Milvus server). Neither engine can join the
other's transaction, so the order of the steps is what keeps them in agreement:

- **add**: the items are committed to the metadata as *pending* (new contents get their ids there;
  contents already present, through any replica, keep theirs), their vectors are inserted into every
  task's collection, then the items are marked committed. A reader never returns a pending id, so a
  search never shows an item whose vectors are half inserted. A duplicate of an add still in flight on
  another replica is answered once that add is committed (``wait_s``); if it is rolled back instead, the
  content is added again here.
- **remove**: the row first (readers stop returning the id at once), then the vectors.
- **repair** (on start, and ``modret index repair``): what a crashed replica left. A pending item older
  than ``older_than_s`` (longer than any add takes) whose vectors are in every task is committed (the
  crash came after the vectors); one with vectors missing anywhere is rolled back (row, then its partial
  vectors). Vectors without any row are a delete (or roll-back) that stopped after its row: removed. An
  add that was merely slow, not crashed, learns on commit that its items were rolled back, removes its
  vectors and fails (``ReplicaWriteError``), so nothing it did stays half done.

A store whose collections carry the items' labels (``index.milvus_labels``, so that label filters run
inside Milvus) gets them with the vectors: ``add(..., labelled=True)``. ``index.shared_gallery`` drives
these for galleries whose metadata is PostgreSQL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np

from index.metadata import NewItem
from index.metadata_contract import SharedMetadataStore
from index.store import UnknownIdError, VectorStore

log = logging.getLogger(__name__)

REPAIR_AFTER_S = 300.0  # a pending row older than this is a crashed add (an add takes seconds)
_POLL_S = 0.05  # how often a duplicate of an add in flight elsewhere checks whether it was committed


class LabelledStore(VectorStore, Protocol):
    """A store that keeps each item's labels with its vectors (``index.milvus_labels``)."""

    def add(
        self,
        ids: np.ndarray,
        vectors_by_task: dict[str, np.ndarray],
        labels: Sequence[Mapping[str, Any]] | None = None,
    ) -> None: ...


class ReplicaWriteError(RuntimeError):
    """A write that could not complete (its items were rolled back meanwhile, or a duplicate's add on
    another replica neither committed nor rolled back in time); nothing of it stays visible."""


@dataclass
class Repair:
    committed: list[int] = field(default_factory=list)  # pending items with every vector: finished
    rolled_back: list[int] = field(default_factory=list)  # pending items missing vectors: undone
    orphans: list[int] = field(default_factory=list)  # vectors without a row: removed

    def describe(self) -> list[str]:
        parts = [
            (self.committed, "pending items whose vectors were all stored were committed"),
            (self.rolled_back, "pending items whose vectors were never (fully) stored were rolled back"),
            (self.orphans, "vectors without a metadata row (an interrupted delete) were removed"),
        ]
        return [f"{len(ids)} {what} (e.g. {ids[:5]})" for ids, what in parts if ids]


def add(
    metadata: SharedMetadataStore,
    store: VectorStore,
    tasks: Sequence[str],
    items: Sequence[NewItem],
    vectors: np.ndarray,
    *,
    wait_s: float = 30.0,
    labelled: bool = False,
) -> tuple[list[int], list[bool]]:
    """Add ``items`` with their (N, T, D) ``vectors`` in ``tasks`` order; returns the ids and whether each
    item is new. Every returned id is committed on return. ``labelled``: ``store`` is a ``LabelledStore``
    and gets the items' labels with their vectors."""
    ids, new = metadata.add(items, pending=True)
    rows = [i for i, is_new in enumerate(new) if is_new]
    if rows:
        new_ids = np.array([ids[i] for i in rows], dtype=np.int64)
        labels = [items[i].labels for i in rows] if labelled else None
        store_vectors(metadata, store, tasks, new_ids, vectors[rows], labels=labels)
    others = sorted({ids[i] for i, is_new in enumerate(new) if not is_new})
    gone = _wait_committed(metadata, others, wait_s)
    if not gone:
        return ids, new
    # The add that these duplicates waited for was rolled back: add their contents here instead.
    again = [i for i, item_id in enumerate(ids) if item_id in gone]
    retried_ids, retried_new = add(
        metadata, store, tasks, [items[i] for i in again], vectors[again], wait_s=wait_s, labelled=labelled
    )
    for i, item_id, is_new in zip(again, retried_ids, retried_new, strict=True):
        ids[i], new[i] = item_id, is_new
    return ids, new


def store_vectors(
    metadata: SharedMetadataStore,
    store: VectorStore,
    tasks: Sequence[str],
    new_ids: np.ndarray,
    vectors: np.ndarray,
    labels: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Steps 2 and 3 of an add: the vectors of the pending ``new_ids`` (rows of ``vectors``) into every
    task (with their ``labels``, for a ``LabelledStore``), then commit. Undoes what it did on failure, and
    when a repair pass rolled the items back."""
    by_task = {task: vectors[:, j] for j, task in enumerate(tasks)}
    try:
        if labels is None:
            store.add(new_ids, by_task)
        else:
            cast(LabelledStore, store).add(new_ids, by_task, labels=labels)
    except BaseException:
        try:  # best effort: what is left over is a pending row, which the repair pass rolls back
            store.remove(new_ids[np.isin(new_ids, metadata.rollback(new_ids))])
        except Exception:
            log.exception("rolling back a failed add of %d items", len(new_ids))
        raise
    committed = metadata.commit(new_ids)
    unsure = np.setdiff1d(new_ids, committed)  # committed by a repair pass already, or rolled back by one
    lost = np.setdiff1d(unsure, np.array(sorted(metadata.states(unsure)), dtype=np.int64))
    if len(lost):
        store.remove(lost)
        raise ReplicaWriteError(
            f"{len(lost)} of {len(new_ids)} items were rolled back by a repair pass while their vectors were "
            "being stored (the add took longer than the repair's limit); nothing of them is kept: add again"
        )


def _wait_committed(metadata: SharedMetadataStore, ids: Sequence[int], wait_s: float) -> set[int]:
    """Wait until none of ``ids`` is pending; returns those that no longer exist (rolled back)."""
    deadline = time.monotonic() + wait_s
    while True:
        states = metadata.states(ids)
        pending = [i for i in ids if states.get(i) == "pending"]
        if not pending:
            return {i for i in ids if i not in states}
        if time.monotonic() > deadline:
            raise ReplicaWriteError(
                f"{len(pending)} duplicate(s) of this upload are being added by another replica and were not "
                f"committed within {wait_s:g} s (e.g. id {pending[0]}); try again"
            )
        time.sleep(_POLL_S)


def remove(metadata: SharedMetadataStore, store: VectorStore, ids: Sequence[int] | np.ndarray) -> int:
    """Remove ``ids``: rows first, then vectors. Returns how many rows there were."""
    wanted = np.asarray(ids, dtype=np.int64)
    removed = metadata.remove(wanted)
    store.remove(wanted)
    return removed


def _stored_everywhere(store: VectorStore, tasks: Sequence[str], ids: np.ndarray) -> np.ndarray:
    everywhere = ids
    for task in tasks:
        try:
            store.get(task, everywhere)
        except UnknownIdError as e:
            everywhere = np.setdiff1d(everywhere, e.ids)
    return everywhere


def repair(
    metadata: SharedMetadataStore,
    store: VectorStore,
    tasks: Sequence[str],
    *,
    older_than_s: float = 600.0,
    orphans: bool = True,
) -> Repair:
    """Finish or roll back what crashed replicas left (module docstring). ``older_than_s``: a pending item
    younger than this may be an add in progress and is left alone. ``orphans`` reads every task's ids
    (a pass over the store) to find vectors without a row."""
    report = Repair()
    stale = np.array([record.id for record in metadata.pending(older_than_s)], dtype=np.int64)
    if len(stale):
        complete = _stored_everywhere(store, tasks, stale)
        report.committed = metadata.commit(complete).tolist()
        rolled_back = metadata.rollback(np.setdiff1d(stale, complete))  # only rows still pending
        store.remove(rolled_back)
        report.rolled_back = rolled_back.tolist()
    if orphans:
        # The store first, then the rows: an add in flight has its row before its first vector.
        stored = np.unique(np.concatenate([store.ids(task) for task in tasks]))
        without = np.setdiff1d(stored, metadata.ids(include_pending=True))
        if len(without):
            store.remove(without)
        report.orphans = without.tolist()
    for line in report.describe():
        log.warning("repair: %s", line)
    return report
