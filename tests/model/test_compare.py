"""The comparison's budgets: which recipe each dataset trains with when options are left out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from model.compare import REAL_DATA_BUDGET, SYNTHFACES_BUDGET, compare_budget, markdown_table
from model.data import DATASETS
from model.train import TrainConfig


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_each_dataset_gets_its_measured_budget(dataset):
    budget = compare_budget(dataset)
    # Per-task neck statistics helped synthetic faces at every seed and cost real faces 4 points.
    assert budget.neck == ("task" if dataset == "synthfaces" else "batch")
    assert budget is (SYNTHFACES_BUDGET if dataset == "synthfaces" else REAL_DATA_BUDGET)
    cfg = TrainConfig(**budget.train_options())  # every budget field is a training option
    assert cfg.modulate == ["1", "2", "3", "4", "emb"] and cfg.modulation_init == "routing"


def test_the_budgets_differ_only_in_the_neck():
    assert replace(SYNTHFACES_BUDGET, neck="batch") == REAL_DATA_BUDGET


def test_markdown_table_has_one_row_per_architecture():
    result = {
        "tasks": {"Smiling": {"triplet_accuracy": 0.9, "map": 0.8, "precision_at_10": 0.7}},
        "mean": {"triplet_accuracy": 0.9, "map": 0.8, "precision_at_10": 0.7},
        "params": {"total": 1000, "per_task_extra": 10},
        "train_seconds": 12.3,
    }
    table = markdown_table({"shared": result, "modulated": result}).splitlines()
    assert table[0].startswith("| arch | Smiling | mean acc")
    assert table[2].startswith("| shared | 0.900 |") and table[3].startswith("| modulated | 0.900 |")
    assert table[3].endswith("| 1,000 | 10 | 12 |")
