"""Ranking against a brute-force oracle over the stored vectors: single, combined and negative tasks,
filters, exclusions, paging and ``min_score`` give the ids and scores an exhaustive weighted dot product
gives; explanations are dot products with the stored vectors; ids removed meanwhile are left out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from index.gallery import Gallery
from service.runtime import ranking
from service.runtime.errors import InvalidQuery
from service.runtime.queries import WeightedTask
from tests.factories import TASKS

SCORE_ATOL = 1e-5  # faiss inner products vs numpy dot products: float32 summation order


@pytest.fixture
def gallery(index_dir: Path) -> Iterator[Gallery]:
    opened = Gallery.open(index_dir)
    yield opened
    opened.close()


def queries_for(gallery: Gallery, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for task in gallery.tasks:
        vector = rng.standard_normal(gallery.embedding_dim).astype(np.float32)
        out[task] = vector / np.linalg.norm(vector)
    return out


def oracle(
    gallery: Gallery,
    tasks: Sequence[WeightedTask],
    queries: Mapping[str, np.ndarray],
    *,
    k: int,
    offset: int = 0,
    min_score: float | None = None,
    allowed: np.ndarray | None = None,
    exclude: Sequence[int] = (),
) -> list[tuple[int, float]]:
    ids = gallery.store.ids(tasks[0].name)
    if allowed is not None:
        ids = ids[np.isin(ids, allowed)]
    ids = ids[~np.isin(ids, np.asarray(exclude, dtype=np.int64))]
    scores = np.zeros(len(ids), dtype=np.float64)
    for task in tasks:
        scores += task.weight * (gallery.vectors(ids, task.name).astype(np.float64) @ queries[task.name])
    pairs = sorted(zip(ids.tolist(), scores.tolist(), strict=True), key=lambda p: (-p[1], p[0]))
    if min_score is not None:
        pairs = [p for p in pairs if p[1] >= min_score]
    return pairs[offset : offset + k]


def assert_same_ranking(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert len(got) == len(want)
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=SCORE_ATOL)
    for position, ((got_id, _), (want_id, want_score)) in enumerate(zip(got, want, strict=True)):
        if got_id != want_id:  # only a near tie may swap
            other = dict(want).get(got_id)
            assert other is not None and abs(other - want_score) <= 2 * SCORE_ATOL, (position, got, want)


def weighted(*specs: tuple[str, float]) -> list[WeightedTask]:
    return [WeightedTask(name, TASKS.index(name), weight) for name, weight in specs]


CASES = [
    weighted(("Smiling", 1.0)),
    weighted(("Eyeglasses", -1.0)),
    weighted(("Smiling", 1.0), ("Eyeglasses", -1.0)),
    weighted(("Black_Hair", 0.5), ("Wearing_Hat", 2.0), ("Smiling", -0.3)),
]


@pytest.mark.parametrize("tasks", CASES, ids=lambda ts: ",".join(f"{t.name}:{t.weight:g}" for t in ts))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_matches_brute_force(gallery: Gallery, tasks: list[WeightedTask], seed: int) -> None:
    queries = queries_for(gallery, seed)
    # A candidate factor that covers the 24-item gallery: the oracle is exhaustive.
    for k, offset in ((5, 0), (4, 3), (30, 0)):
        got = ranking.rank(gallery, tasks, queries, k=k, offset=offset, candidate_factor=24)
        assert_same_ranking(got, oracle(gallery, tasks, queries, k=k, offset=offset))


def test_filters_exclusions_and_min_score_match_brute_force(gallery: Gallery) -> None:
    queries = queries_for(gallery, 3)
    tasks = weighted(("Smiling", 1.0), ("Black_Hair", 1.0))
    allowed = ranking.allowed_ids(gallery, {"smiling": 1})  # names match case-insensitively
    assert allowed is not None and 0 < len(allowed) < 24
    exclude = [int(allowed[0])]
    got = ranking.rank(
        gallery,
        tasks,
        queries,
        k=10,
        filter={"smiling": 1},
        exclude=exclude,
        min_score=-0.5,
        candidate_factor=24,
    )
    want = oracle(gallery, tasks, queries, k=10, allowed=allowed, exclude=exclude, min_score=-0.5)
    assert_same_ranking(got, want)
    assert all(i in set(allowed.tolist()) and i not in exclude for i, _ in got)
    with pytest.raises(InvalidQuery, match="Nope"):
        ranking.allowed_ids(gallery, {"Nope": 1})
    with pytest.raises(InvalidQuery, match="Nope"):
        ranking.rank(gallery, tasks, queries, k=5, filter={"Nope": 1})
    assert ranking.rank(gallery, tasks, queries, k=5, filter={"Smiling": 7}) == []  # no item has the value


def test_a_filtered_search_over_several_tasks_looks_the_filter_up_once(
    gallery: Gallery, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[dict[str, object]] = []
    matching = gallery.metadata.matching

    def counted(conditions):  # the real lookup, counted
        lookups.append(dict(conditions))
        return matching(conditions)

    monkeypatch.setattr(gallery.metadata, "matching", counted)
    tasks = weighted(("Smiling", 1.0), ("Black_Hair", 0.5), ("Eyeglasses", -0.5))
    got = ranking.rank(
        gallery, tasks, queries_for(gallery, 5), k=5, filter={"smiling": 1}, candidate_factor=24
    )
    # the name as given is unknown (one failed lookup), then resolved: not one lookup per task
    assert got and lookups == [{"smiling": 1}, {"Smiling": 1}]
    lookups.clear()
    again = ranking.rank(
        gallery, tasks, queries_for(gallery, 5), k=5, filter={"Smiling": 1}, candidate_factor=24
    )
    assert again == got
    assert lookups == [{"Smiling": 1}]


def test_explain_is_the_dot_product_with_stored_vectors(gallery: Gallery) -> None:
    queries = queries_for(gallery, 4)
    ids = [3, 1, 7]
    explained = ranking.explain(gallery, queries, ids)
    assert set(explained) == set(ids)
    for task, query in queries.items():
        want = gallery.vectors(ids, task) @ query
        got = [explained[i][task] for i in ids]
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_ids_removed_meanwhile_are_left_out(gallery: Gallery) -> None:
    queries = queries_for(gallery, 5)
    gallery.remove([2, 5])
    scores = ranking.similarities_for(gallery, "Smiling", queries["Smiling"], np.array([1, 2, 5, 6]))
    assert set(scores) == {1, 6}
    assert set(ranking.explain(gallery, queries, [1, 2])[2]) == set()  # no score under any task
    got = ranking.rank(gallery, CASES[2], queries, k=30, candidate_factor=24)
    assert {2, 5}.isdisjoint(i for i, _ in got) and len(got) == 22
