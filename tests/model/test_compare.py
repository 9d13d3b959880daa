"""The comparison's budgets: which recipe each dataset trains with when options are left out."""

from __future__ import annotations

import pytest

from model.compare import compare_budget, markdown_table
from model.data import DATASETS
from model.network import BatchNeck, MultiTaskEmbedder, TaskNeck, create_model
from model.train import TrainConfig


def _network(dataset: str) -> MultiTaskEmbedder:
    cfg = TrainConfig(**compare_budget(dataset).train_options())
    return create_model(cfg.model_config(["Smiling", "Eyeglasses", "Bald"]))


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_each_dataset_trains_the_neck_measured_for_it(dataset):
    # Per-task neck statistics helped synthetic faces at every seed and cost real faces 4 points.
    neck = _network(dataset).trunk(0).neck
    assert isinstance(neck, TaskNeck if dataset == "synthfaces" else BatchNeck)
    cfg = TrainConfig(**compare_budget(dataset).train_options())  # every budget field is a training option
    assert cfg.modulate == ["1", "2", "3", "4", "emb"] and cfg.modulation_init == "routing"


def test_real_and_synthetic_budgets_build_the_same_parameters():
    # The per-task neck keeps its statistics in buffers: both recipes train the same parameters.
    synthetic, real = _network("synthfaces"), _network("celeba")
    shapes = {name: p.shape for name, p in synthetic.named_parameters()}
    assert shapes == {name: p.shape for name, p in real.named_parameters()}
    assert {n for n, _ in synthetic.named_buffers()} != {n for n, _ in real.named_buffers()}


def test_markdown_table_has_one_row_per_architecture():
    result = {
        "tasks": {"Smiling": {"triplet_accuracy": 0.9, "map": 0.8, "precision_at_10": 0.7}},
        "mean": {"triplet_accuracy": 0.9, "map": 0.8, "precision_at_10": 0.7, "leakage": 0.0712},
        "params": {"total": 1000, "per_task_extra": 10},
        "train_seconds": 12.3,
    }
    older = {**result, "mean": {k: v for k, v in result["mean"].items() if k != "leakage"}}
    table = markdown_table({"shared": older, "modulated": result}).splitlines()
    assert table[0].startswith("| arch | Smiling | mean acc")
    assert "| mean P@10 | mean leak | params |" in table[0]
    assert table[2].startswith("| shared | 0.900 |") and table[3].startswith("| modulated | 0.900 |")
    assert table[2].endswith("| 0.700 | - | 1,000 | 10 | 12 |")  # compared before leakage was measured
    assert table[3].endswith("| 0.700 | 0.071 | 1,000 | 10 | 12 |")
