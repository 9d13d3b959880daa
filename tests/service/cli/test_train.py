"""The `modret` model commands end to end on tiny synthetic data: train, eval, diagnose, compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from model.compare import SYNTHFACES_BUDGET
from model.data.celeba import OFFICIAL_7
from service.cli import app

TINY = [
    "--num-images", "120", "--tasks", "pale_skin,Wearing_Hat", "--width", "4", "--image-size", "32",
    "--embedding-dim", "8", "--per-task", "2", "--device", "cpu",
]  # fmt: skip
runner = CliRunner()


@pytest.fixture(scope="module")
def trained_run_dir(tmp_path_factory):
    """A run written by ``modret train`` itself (what these tests check), not by ``tests.factories``."""
    out = tmp_path_factory.mktemp("run")
    result = runner.invoke(app, ["train", "--out", str(out), "--steps", "4", *TINY])
    assert result.exit_code == 0, result.output
    return out


def test_train_prints_the_evaluation_and_writes_the_run(trained_run_dir):
    assert (trained_run_dir / "model.safetensors").is_file()
    config = json.loads((trained_run_dir / "config.json").read_text())
    assert config["model"]["task_names"] == ["Pale_Skin", "Wearing_Hat"]  # canonical case


def test_eval_json_has_the_documented_shape(trained_run_dir):
    result = runner.invoke(app, ["eval", "--run", str(trained_run_dir), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["tasks"]) == {"Pale_Skin", "Wearing_Hat"}
    for metrics in [*report["tasks"].values(), report["mean"]]:
        assert set(metrics) == {"triplet_accuracy", "map", "precision_at_10"}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert report["params"]["per_task_extra"] > 0


def test_diagnose_reports_cosines_overall_and_per_layer(trained_run_dir):
    result = runner.invoke(
        app, ["diagnose", "--run", str(trained_run_dir), "--json", "--batches", "1", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert -1.0 <= report["overall"] <= 1.0
    assert {"stem", "stage1", "stage4", "fc"} <= set(report["per_layer"])
    assert len(report["pairwise"]) == 2


def test_compare_prints_one_row_per_architecture(tmp_path):
    args = ["compare", "--archs", "shared,modulated", "--steps", "2", "--out", str(tmp_path), *TINY[:-2]]
    args += ["--device", "cpu"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"shared", "modulated"}
    assert report["shared"]["params"]["per_task_extra"] == 0
    trained = json.loads((tmp_path / "modulated" / "config.json").read_text())["train"]
    budget = SYNTHFACES_BUDGET  # options left out come from the documented budget
    assert trained["modulation_init"] == budget.modulation_init and trained["mining"] == budget.mining
    assert trained["modulate"] == list(budget.modulate) and trained["warmup"] == budget.warmup
    assert trained["neck"] == budget.neck == "task"
    assert trained["steps"] == 2 and trained["per_task"] == 2  # ... and given ones win
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "| shared |" in table.stdout and "| modulated |" in table.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "--archs", "shared,bogus"], "unknown architectures"),
        (["train", "--out", "x", "--dataset", "imagenet"], "unknown dataset"),
        (["train", "--out", "x", "--tasks", "Smiling,Flying"], "Flying"),
        (["train", "--out", "x", "--dataset", "celeba", "--data-dir", "/nonexistent"], "/nonexistent"),
        (["eval", "--run", "/nonexistent"], "not found"),
    ],
)
def test_bad_input_exits_with_a_clear_message(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output


CELEBA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "celeba-10k"


@pytest.mark.celeba
@pytest.mark.skipif(
    not CELEBA.is_dir(), reason="the real CelebA sample (../shared/data/celeba-10k) is absent"
)
def test_train_on_the_real_celeba_sample_with_the_official_tasks(tmp_path):
    args = ["train", "--out", str(tmp_path), "--dataset", "celeba", "--data-dir", str(CELEBA)]
    args += ["--tasks", "official7", "--num-images", "2000", "--steps", "2", *TINY[4:]]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["task_names"] == list(OFFICIAL_7)
