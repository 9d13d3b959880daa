"""Ranking gallery items for a query: per-task candidates, weighted re-ranking, "why similar" scores.

Blocking (faiss / SQLite): routes call these functions in a worker thread, never on the event loop.

A query has one vector per requested task. Candidates are gathered per task — for a negative weight the
search runs with the negated vector, so it gathers the items *least* similar under that task — then each
candidate's similarity under every requested task is completed by a dot product with its stored vectors
(``store.get``: one batched read per task, no further search), and the ranking score is the weighted sum
``Σ w_t · sim_t``. With one task of weight 1 the score is the plain cosine similarity. ``explain`` is the
same dot product over the results under every task. For exact stores the dot product is the score the
search would give (within float rounding); for IVF-PQ it uses the decoded vectors, which is what a search
restricted to those ids approximated too, without missing ids outside the probed lists.

The label filter goes to the gallery's search with each task (``ServedGallery.search``: resolved by the
metadata for a single-machine gallery, an expression inside Milvus for a shared one); names are matched
case-insensitively only when the spelling given is not a stored label (the gallery says so: then the
names are looked up once and the search runs again).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from index.metadata import ItemRecord, UnknownLabelError
from index.served import LabelFilter, ServedGallery
from index.store import PAD_ID, SearchResult, UnknownIdError
from model.data.base import LabelValue
from service.runtime.errors import InvalidQuery
from service.runtime.queries import WeightedTask

MAX_CANDIDATES = 5000


@dataclass(frozen=True)
class Hit:
    id: int
    score: float
    record: ItemRecord
    similarities: dict[str, float] | None  # every task's similarity, when explained


def allowed_ids(gallery: ServedGallery, conditions: Mapping[str, LabelValue]) -> np.ndarray | None:
    """Ids satisfying the label filter (label names case-insensitive), None for no filter (a metadata
    lookup: for oracles and listings; searches pass the filter itself to the gallery)."""
    if not conditions:
        return None
    try:
        return gallery.metadata.matching(conditions)  # the names as given: one lookup
    except UnknownLabelError:
        pass
    resolved = resolve_names(gallery, conditions)
    return gallery.metadata.matching(resolved)


def resolve_names(gallery: ServedGallery, conditions: Mapping[str, LabelValue]) -> dict[str, LabelValue]:
    """``conditions`` with each name spelt as a stored label (case-insensitively); ``InvalidQuery`` for a
    name no item has."""
    names = {name.lower(): name for name in gallery.metadata.label_names()}
    resolved = {names.get(name.lower(), name): value for name, value in conditions.items()}
    unknown = [name for name in resolved if name not in names.values()]
    if unknown:
        known = ", ".join(sorted(names.values())) or "none"
        raise InvalidQuery(
            f"no gallery item has a label {unknown[0]!r}; known labels: {known}",
            {"known_labels": sorted(names.values())},
            code="unknown_label",
        )
    return resolved


class _Filter:
    """A search's label filter, resolved by the gallery once (``label_filter``: one metadata lookup, or one
    expression) for every task the search runs; label names matched case-insensitively when the names as
    given are unknown."""

    def __init__(self, conditions: Mapping[str, LabelValue] | None) -> None:
        self.conditions = dict(conditions) if conditions else None
        self.prepared: LabelFilter | None = None

    def search(self, gallery: ServedGallery, task: str, queries: np.ndarray, k: int) -> SearchResult:
        if self.conditions is not None and self.prepared is None:
            try:
                self.prepared = gallery.label_filter(self.conditions)
            except UnknownLabelError:
                try:
                    self.prepared = gallery.label_filter(resolve_names(gallery, self.conditions))
                except UnknownLabelError as exc:  # removed meanwhile
                    raise InvalidQuery(str(exc), code="unknown_label") from None
        return gallery.search(task, queries, k, self.prepared)


def vectors_of(gallery: ServedGallery, task: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored (n, D) vectors under ``task`` of those ``ids`` still stored, and those ids (one batched
    read; ids removed meanwhile are left out)."""
    while True:
        try:
            return ids, gallery.store.get(task, ids)
        except UnknownIdError as exc:
            ids = ids[~np.isin(ids, exc.ids)]
            if not len(ids):
                return ids, np.empty((0, gallery.embedding_dim), dtype=np.float32)


def similarities_for(
    gallery: ServedGallery, task: str, query: np.ndarray, ids: np.ndarray
) -> dict[int, float]:
    """Cosine similarity of ``ids`` to ``query`` (D,) under ``task`` (ids no longer stored are left out)."""
    if not len(ids):
        return {}
    kept, vectors = vectors_of(gallery, task, np.asarray(ids, dtype=np.int64))
    scores = vectors @ np.asarray(query, dtype=np.float32)  # (n, D) @ (D,) -> (n,)
    return dict(zip(kept.tolist(), scores.tolist(), strict=True))


def rank(
    gallery: ServedGallery,
    tasks: Sequence[WeightedTask],
    queries: Mapping[str, np.ndarray],
    *,
    k: int,
    offset: int = 0,
    min_score: float | None = None,
    filter: Mapping[str, LabelValue] | None = None,
    exclude: Sequence[int] = (),
    candidate_factor: int = 4,
) -> list[tuple[int, float]]:
    """The ``(id, score)`` pairs at ranks ``offset+1 … offset+k``, best first, among the items whose labels
    satisfy ``filter`` (names case-insensitive)."""
    labels = _Filter(filter)
    want = offset + k + len(exclude)
    per_task = want if len(tasks) == 1 else min(MAX_CANDIDATES, max(want, candidate_factor * want))
    excluded = {int(i) for i in exclude}
    sims: dict[str, dict[int, float]] = {}
    candidates: set[int] = set()
    for task in tasks:
        sign = 1.0 if task.weight > 0 else -1.0
        found = labels.search(gallery, task.name, sign * queries[task.name][None, :], per_task)
        scores = {
            int(i): sign * float(s) for i, s in zip(found.ids[0], found.scores[0], strict=True) if i != PAD_ID
        }
        sims[task.name] = scores
        candidates.update(scores)
    candidates -= excluded
    if len(tasks) > 1:
        pool = np.array(sorted(candidates), dtype=np.int64)
        for task in tasks:
            missing = pool[~np.isin(pool, np.fromiter(sims[task.name], dtype=np.int64))]
            sims[task.name].update(similarities_for(gallery, task.name, queries[task.name], missing))
        # An id removed between the searches has no score under some task: it is dropped.
        candidates = {i for i in candidates if all(i in sims[t.name] for t in tasks)}
    scored = [(i, sum(t.weight * sims[t.name][i] for t in tasks)) for i in candidates]
    scored.sort(key=lambda pair: (-pair[1], pair[0]))
    if min_score is not None:
        scored = [pair for pair in scored if pair[1] >= min_score]
    return scored[offset : offset + k]


def explain(
    gallery: ServedGallery, queries_all: Mapping[str, np.ndarray], ids: Sequence[int]
) -> dict[int, dict[str, float]]:
    """For each id, its similarity to the query under every task in ``queries_all``."""
    wanted = np.array(sorted(set(ids)), dtype=np.int64)
    out: dict[int, dict[str, float]] = {int(i): {} for i in wanted}
    for task, query in queries_all.items():
        for item, score in similarities_for(gallery, task, query, wanted).items():
            out[item][task] = round(score, 6)
    return out


def hits(
    gallery: ServedGallery,
    ranked: Sequence[tuple[int, float]],
    explained: Mapping[int, dict[str, float]] | None,
) -> list[Hit]:
    """Attach metadata; items deleted meanwhile are skipped."""
    records = gallery.items([i for i, _ in ranked])
    return [
        Hit(i, score, records[i], dict(explained.get(i, {})) if explained is not None else None)
        for i, score in ranked
        if i in records
    ]
