"""The proxy loss: its value, what its gradient does, its errors, and training with it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model.proxies import TaskProxies
from model.train import DataConfig, train
from tests.factories import tiny_train_config


def _brute_force(proxies: TaskProxies, e: torch.Tensor, y: torch.Tensor, columns, counts) -> torch.Tensor:
    losses = []
    for k, t in enumerate(columns):
        p = F.normalize(proxies.weight[t, : counts[t]], dim=-1)  # only the task's own values
        for g in range(e.shape[1]):
            if y[k, g] != -1:
                logits = F.normalize(e[k, g], dim=-1) @ p.T / proxies.temperature
                losses.append(-torch.log_softmax(logits, 0)[y[k, g]])
    return torch.stack(losses).mean()


def test_loss_is_the_cross_entropy_over_each_tasks_own_values_of_known_rows():
    torch.manual_seed(0)
    counts = [2, 3, 2]
    proxies = TaskProxies(counts, dim=4, temperature=0.1)
    e = torch.randn(2, 5, 4)
    y = torch.tensor([[0, 1, -1, 2, 1], [1, 0, 0, -1, 1]])  # task 1 has 3 values, task 2 has 2
    columns = np.array([1, 2])
    expected = _brute_force(proxies, e, y, columns, counts)
    torch.testing.assert_close(proxies(e, y, columns), expected, atol=1e-6, rtol=1e-5)


def test_training_on_the_loss_puts_each_embedding_nearest_its_values_proxy():
    torch.manual_seed(0)
    proxies = TaskProxies([3], dim=8, temperature=0.1)
    e = torch.randn(1, 12, 8, requires_grad=True)
    y = torch.tensor([[0, 1, 2] * 4])
    optimizer = torch.optim.Adam([e, proxies.weight], lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        proxies(e, y, np.array([0])).backward()
        optimizer.step()
    cosine = F.normalize(e[0], dim=-1) @ F.normalize(proxies.weight[0], dim=-1).T  # (12, 3)
    assert torch.equal(cosine.argmax(1), y[0])


def test_a_batch_without_labels_has_zero_loss_and_a_gradient():
    proxies = TaskProxies([2], dim=4)
    e = torch.randn(1, 3, 4, requires_grad=True)
    loss = proxies(e, torch.full((1, 3), -1), np.array([0]))
    loss.backward()
    assert loss.item() == 0.0 and e.grad is not None


@pytest.mark.parametrize(
    ("counts", "temperature", "match"),
    [([2], 0.0, "temperature"), ([], 0.1, "label value"), ([0], 0.1, "label")],
)
def test_bad_settings_are_clear_errors(counts, temperature, match):
    with pytest.raises(ValueError, match=match):
        TaskProxies(counts, dim=4, temperature=temperature)


TASKS = ["Pale_Skin", "Wearing_Hat", "Eyeglasses"]


@pytest.mark.parametrize("mining", ["batch-all", "all-tasks"])
def test_training_with_the_proxy_loss_learns_and_stores_no_proxies(tmp_path, mining):
    data = DataConfig(tasks=["Pale_Skin"], num_images=300)
    cfg = tiny_train_config(loss="proxy", mining=mining, steps=30, per_task=8, lr=1e-2, data=data)
    metrics = train(cfg, tmp_path / "proxy", progress=False)
    losses = [h["loss"] for h in metrics["history"]]
    assert losses and all(math.isfinite(v) and v > 0 for v in losses)
    assert metrics["test"]["mean"]["triplet_accuracy"] > 0.8, metrics["test"]
    triplet = tiny_train_config(mining=mining, steps=1, data=data)
    train(triplet, tmp_path / "triplet", progress=False)
    # The proxies are training-only: the run holds exactly the tensors a triplet-loss run holds.
    a = load_file(str(tmp_path / "proxy" / "model.safetensors"))
    b = load_file(str(tmp_path / "triplet" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


@pytest.mark.parametrize(
    ("options", "match"), [({"mining": "none"}, "batch-all"), ({"loss": "hinge"}, "unknown loss")]
)
def test_a_loss_that_cannot_train_is_a_clear_error(tmp_path, options, match):
    cfg = tiny_train_config(**{"loss": "proxy", "data": DataConfig(tasks=TASKS, num_images=60), **options})
    with pytest.raises(ValueError, match=match):
        train(cfg, tmp_path, progress=False)
