"""The decorrelation term on hand-built embeddings: what it scores, and that descending it removes leakage
as ``model.evaluate`` measures it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.decorrelation import class_label_means, decorrelation_loss, ramped
from model.evaluate import retrieval_metrics
from model.train import DataConfig, train
from tests.factories import tiny_train_config


def _embed(labels: np.ndarray, copies: int | None, seed: int = 0) -> torch.Tensor:
    """(N, D) embeddings under task 0: its value on one axis, noise, and ``copies``' value on another."""
    g = torch.Generator().manual_seed(seed)
    e = 0.1 * torch.randn(len(labels), 8, generator=g)
    e[:, 0] += 3 * torch.from_numpy(labels[:, 0]).float()
    e[:, 2] += 1.0
    if copies is not None:
        e[:, 1] += torch.from_numpy(labels[:, copies]).float()
    return F.normalize(e, dim=1)


def _term(e: torch.Tensor, labels: np.ndarray, means: torch.Tensor) -> torch.Tensor:
    y = torch.from_numpy(labels)
    return decorrelation_loss(e[None], y[None, :, 0], y[None], torch.tensor([0]), means)


def test_class_label_means_are_the_conditional_frequencies():
    labels = np.array([[0, 1], [0, 1], [0, 0], [1, 0], [1, -1]])
    means = class_label_means(labels)  # (A, V, A, V)
    assert means[0, 0, 1].tolist() == pytest.approx([1 / 3, 2 / 3])  # among t=0: a is 1 twice out of 3
    assert means[0, 1, 1].tolist() == pytest.approx([1.0, 0.0])  # the unknown a is skipped
    assert means[0, 1, 0].tolist() == pytest.approx([0.0, 1.0])  # a task's own value is fixed


def test_an_embedding_that_copies_another_attribute_scores_high_a_clean_one_zero():
    labels = np.random.default_rng(0).integers(0, 2, size=(400, 3))
    means = class_label_means(labels)
    leaky, clean = _term(_embed(labels, copies=1), labels, means), _term(_embed(labels, None), labels, means)
    assert float(leaky) > 0.02
    assert float(clean) == pytest.approx(0.0, abs=0.005)


def test_an_attribute_the_task_value_fixes_is_not_penalised():
    # b is the task's own value again (as Bald fixes the hair colours): encoding it is no leak.
    rng = np.random.default_rng(1)
    t = rng.integers(0, 2, 400)
    labels = np.stack([t, rng.integers(0, 2, 400), t], axis=1)
    e = _embed(labels, copies=2)
    assert float(_term(e, labels, class_label_means(labels))) == pytest.approx(0.0, abs=0.005)


def test_descending_the_term_removes_the_leakage_evaluate_measures():
    labels = np.random.default_rng(2).integers(0, 2, size=(600, 3))
    means = class_label_means(labels)
    e = _embed(labels, copies=1).clone().requires_grad_(True)
    before = retrieval_metrics(e.detach()[:, None], labels[:, :1], ["t"], seed=0)
    full = retrieval_metrics(e.detach()[:, None].expand(-1, 3, -1), labels, ["t", "a", "b"], seed=0)["t"][
        "leakage_by_attribute"
    ]["a"]
    assert full > 0.4 and before["t"]["precision_at_10"] == pytest.approx(1.0)
    optimiser = torch.optim.SGD([e], lr=5.0)
    g = torch.Generator().manual_seed(3)
    for _ in range(300):  # batches of 24, as training sees them
        batch = torch.randperm(len(labels), generator=g)[:24]
        optimiser.zero_grad()
        _term(F.normalize(e[batch], dim=1), labels[batch.numpy()], means).backward()
        optimiser.step()
    after = F.normalize(e.detach(), dim=1)[:, None].expand(-1, 3, -1)
    result = retrieval_metrics(after, labels, ["t", "a", "b"], seed=0)["t"]
    assert result["leakage_by_attribute"]["a"] < 0.1
    assert result["precision_at_10"] == pytest.approx(1.0, abs=0.01)  # the task itself is kept


def test_the_weight_ramps_up_then_holds():
    assert ramped(4.0, 0.0, 0, 100) == 4.0
    assert [ramped(4.0, 0.5, s, 100) for s in (0, 25, 50, 99)] == pytest.approx([0.0, 2.0, 4.0, 4.0])


@pytest.mark.parametrize("mining", ["batch-all", "all-tasks"])
def test_training_adds_the_term_to_the_loss(tmp_path, mining):
    # The same seeded run with and without the term: the first step's loss differs by the term alone.
    losses = []
    for weight in (0.0, 50.0):
        cfg = tiny_train_config(
            data=DataConfig("synthfaces", num_images=80), steps=1, mining=mining, decorrelation=weight
        )
        metrics = train(cfg, tmp_path / f"{mining}-{weight}", progress=False)
        losses.append(metrics["history"][-1]["loss"])
    assert all(np.isfinite(losses)) and losses[1] != pytest.approx(losses[0], abs=1e-6)
