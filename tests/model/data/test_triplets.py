"""Triplet sampling: value rules, unknowns skipped, balance, every task in every batch, reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from model.data.triplets import Triplets, TripletSampler, fixed_triplets


def _labels(kind: str, n: int = 300, tasks: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = 2 if kind == "binary" else 5
    labels = rng.integers(0, values, (n, tasks))
    labels[rng.random((n, tasks)) < 0.15] = -1
    return labels


def _check(labels: np.ndarray, batch: Triplets, indices: np.ndarray) -> None:
    t = batch.task
    a, p, n = labels[batch.anchor, t], labels[batch.positive, t], labels[batch.negative, t]
    assert (a >= 0).all() and (p >= 0).all() and (n >= 0).all()
    assert (a == p).all()
    assert (a != n).all()
    assert (batch.anchor != batch.positive).all()
    assert np.isin(np.concatenate([batch.anchor, batch.positive, batch.negative]), indices).all()
    for field in (batch.anchor, batch.positive, batch.negative, batch.task):
        assert field.dtype == np.int64


@pytest.mark.parametrize("kind", ["binary", "categorical"])
def test_invariants_hold_on_every_batch(kind: str) -> None:
    labels = _labels(kind)
    indices = np.arange(0, 300, 2)
    sampler = TripletSampler(labels, indices, per_task=16, seed=1)
    for _ in range(20):
        batch = sampler.sample()
        assert len(batch) == 16 * 4
        assert batch.task.tolist() == np.repeat(np.arange(4), 16).tolist()  # every task, task-major
        _check(labels, batch, indices)


@pytest.mark.parametrize("kind", ["binary", "categorical"])
def test_seeded_and_reproducible(kind: str) -> None:
    labels = _labels(kind)
    indices = np.arange(300)
    one, two = TripletSampler(labels, indices, seed=5), TripletSampler(labels, indices, seed=5)
    for _ in range(3):
        a, b = one.sample(), two.sample()
        assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("anchor", "positive", "negative"))
    other = TripletSampler(labels, indices, seed=6).sample()
    assert not np.array_equal(other.anchor, TripletSampler(labels, indices, seed=5).sample().anchor)
    fixed = fixed_triplets(labels, indices, per_task=8, seed=5)
    assert np.array_equal(fixed.anchor, TripletSampler(labels, indices, per_task=8, seed=5).sample().anchor)


def test_anchor_values_are_balanced_even_for_a_rare_value() -> None:
    labels = np.zeros((1000, 1), dtype=np.int64)
    labels[:10] = 1  # 1 % positives
    batch = TripletSampler(labels, np.arange(1000), per_task=4000, seed=0).sample()
    share = labels[batch.anchor, 0].mean()
    assert 0.45 < share < 0.55


def test_a_value_held_once_is_never_an_anchor_but_can_be_a_negative() -> None:
    labels = np.array([[0], [0], [0], [1], [2], [2]])
    batch = TripletSampler(labels, np.arange(6), per_task=500, seed=0).sample()
    assert 3 not in batch.anchor and 3 not in batch.positive
    assert 3 in batch.negative


def test_task_subset_in_given_order() -> None:
    labels = _labels("categorical")
    batch = TripletSampler(labels, np.arange(300), per_task=3, tasks=[2, 0]).sample()
    assert batch.task.tolist() == [2, 2, 2, 0, 0, 0]
    _check(labels, batch, np.arange(300))


@pytest.mark.parametrize(
    "column",
    [[1, 1, 1, 1], [0, 1, -1, -1], [-1, -1, -1, -1]],
    ids=["one value", "no value twice", "all unknown"],
)
def test_unusable_task_is_named(column: list[int]) -> None:
    labels = np.stack([[0, 0, 1, 1], column], axis=1)
    with pytest.raises(ValueError, match="task 1"):
        TripletSampler(labels, np.arange(4))


def test_usable_only_within_the_given_indices() -> None:
    labels = np.array([[0], [0], [1], [1]])
    with pytest.raises(ValueError, match="task 0"):
        TripletSampler(labels, np.array([0, 1]))
