"""Metrics on hand-built embeddings whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.evaluate import leakage, retrieval_metrics, triplet_accuracy

TOL = 1e-4


def _table(labels: np.ndarray, noise: float, seed: int = 0) -> torch.Tensor:
    """(N, T, D): each task's embedding encodes that task's label (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    n, t = labels.shape
    codes = torch.nn.functional.normalize(torch.randn(t, 5, 16, generator=g), dim=2)  # per task, per value
    table = codes[torch.arange(t), torch.from_numpy(labels)] + noise * torch.randn(n, t, 16, generator=g)
    return torch.nn.functional.normalize(table, dim=2)


def test_perfect_embeddings_score_one():
    labels = np.random.default_rng(0).integers(0, 3, size=(60, 2))
    result = retrieval_metrics(_table(labels, 0.0), labels, ["a", "b"], seed=0)
    for task in ("a", "b"):
        assert result[task]["map"] == pytest.approx(1.0, abs=TOL)
        assert result[task]["precision_at_10"] == pytest.approx(1.0, abs=TOL)


def test_random_embeddings_score_the_base_rate():
    labels = np.random.default_rng(1).integers(0, 2, size=(400, 1))
    noise = torch.nn.functional.normalize(
        torch.randn(400, 1, 16, generator=torch.Generator().manual_seed(3)), dim=2
    )
    result = retrieval_metrics(noise, labels, ["a"], seed=0)
    assert result["a"]["map"] == pytest.approx(0.5, abs=0.05)
    assert result["a"]["precision_at_10"] == pytest.approx(0.5, abs=0.05)


def test_unknown_labels_are_neither_queries_nor_gallery():
    labels = np.array([[0], [0], [1], [1], [-1], [-1]])
    table = _table(np.maximum(labels, 0), 0.0)
    table[4:] = table[0]  # unknown items sit exactly on class 0: they would spoil class 1 if counted
    result = retrieval_metrics(table, labels, ["a"], seed=0)
    assert result["a"]["map"] == pytest.approx(1.0, abs=TOL)


def test_average_precision_of_a_known_ranking():
    # Query 0 (value 0) ranks: item 1 (value 1), item 2 (value 0), item 3 (value 1) -> AP = 1/2.
    table = torch.tensor([[1.0, 0.0], [0.9, 0.436], [0.5, 0.866], [0.0, 1.0]]).unsqueeze(1)
    labels = np.array([[0], [1], [0], [1]])
    result = retrieval_metrics(table, labels, ["a"], seed=0, max_queries=4, k=2)
    # Per query APs: q0: 1/2; q1: ranks 0(v0),2(v0),3(v1) -> 1/3; q2: ranks 1(v1),3(v1),0(v0) -> 1/3;
    # q3: ranks 2(v0),1(v1) -> 1/2.
    assert result["a"]["map"] == pytest.approx((0.5 + 1 / 3 + 1 / 3 + 0.5) / 4, abs=TOL)


def test_triplet_accuracy_per_task():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[0.9, 0.1], [0.0, 1.0], [1.0, 0.0]])
    n = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    acc = triplet_accuracy(torch.cat([a, p, n]), np.array([0, 0, 1]), ["x", "y"])
    assert acc == {"x": 0.5, "y": 1.0}


def _leaky_table(labels: np.ndarray, copies: int | None, seed: int = 0) -> torch.Tensor:
    """(N, T, D): task j's value on one axis, small isotropic noise, and for task 0 (when ``copies`` is a
    column) that column's value on a second, smaller axis: every query's top 10 hold its task's value;
    under task 0 with ``copies`` they also share the copied attribute."""
    g = torch.Generator().manual_seed(seed)
    n, t = labels.shape
    table = torch.zeros(n, t, 8)
    table[:, :, 0] = torch.from_numpy(np.maximum(labels, 0)).float() * 4
    if copies is not None:
        table[:, 0, 1] = torch.from_numpy(np.maximum(labels[:, copies], 0)).float()
    table += 0.05 * torch.randn(table.shape, generator=g)
    table[:, :, 2] += 1.0
    return torch.nn.functional.normalize(table, dim=2)


def test_an_embedding_that_copies_another_attribute_leaks_it():
    labels = np.random.default_rng(4).integers(0, 2, size=(1000, 3))  # three independent fair coins
    result = retrieval_metrics(_leaky_table(labels, copies=1), labels, ["t", "a", "b"], seed=0)["t"]
    assert result["precision_at_10"] == pytest.approx(1.0, abs=TOL)
    by = result["leakage_by_attribute"]
    assert by["a"] == pytest.approx(0.5, abs=0.03)  # always the query's a, where chance agrees half the time
    assert by["b"] == pytest.approx(0.0, abs=0.03)
    assert result["leakage"] == pytest.approx(0.25, abs=0.03)  # the mean over a and b
    assert result["leakage_worst"] == by["a"]


def test_a_clean_embedding_leaks_nothing():
    labels = np.random.default_rng(5).integers(0, 2, size=(1000, 3))
    metrics = retrieval_metrics(_leaky_table(labels, copies=None), labels, ["t", "a", "b"], seed=0)
    for result in metrics.values():
        assert result["precision_at_10"] == pytest.approx(1.0, abs=TOL)
        assert result["leakage"] == pytest.approx(0.0, abs=0.03)
        assert all(abs(v) < 0.04 for v in result["leakage_by_attribute"].values())


def test_chance_is_conditioned_on_the_task_value():
    # b is a copy of t (as hair colours are all 0 for bald faces): retrieving by t alone agrees on b
    # every time, and that is not leakage.
    rng = np.random.default_rng(6)
    t = rng.integers(0, 2, 600)
    labels = np.stack([t, rng.integers(0, 3, 600), t], axis=1)
    result = retrieval_metrics(_leaky_table(labels, copies=None), labels, ["t", "a", "b"], seed=0)["t"]
    assert result["leakage_by_attribute"]["b"] == pytest.approx(0.0, abs=TOL)
    assert result["leakage_by_attribute"]["a"] == pytest.approx(0.0, abs=0.04)  # 3 values: chance ~1/3


def test_unknown_labels_take_no_part_in_leakage():
    labels = np.random.default_rng(7).integers(0, 2, size=(600, 2))
    leaky = _leaky_table(labels, copies=1)
    labels[::2, 1] = -1  # half of a's labels unknown: every known retrieved a still agrees
    result = retrieval_metrics(leaky, labels, ["t", "a"], seed=0)["t"]
    assert result["leakage"] == pytest.approx(0.5, abs=0.04)
    everything = np.arange(len(labels))
    labels[:, 1] = -1  # nothing known about a: no figure rather than a made-up one
    assert leakage(labels, 0, everything, everything, np.tile(everything[:10], (600, 1))) == {}
