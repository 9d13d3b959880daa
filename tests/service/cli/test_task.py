"""`modret task add` / `task remove` end to end: a real folder dataset, real runs on disk, exit codes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner, Result

from model.run import load_run
from model.tasks import fingerprints
from service.cli import app
from tests.factories import TASKS, face

runner = CliRunner()
NEW = "Bald"
FACES = 120


def text(result: Result) -> str:
    return " ".join(result.output.split())  # rich wraps at the console width


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder: rendered faces and a labels.csv with a new column (Bald) beside an old one."""
    root = tmp_path_factory.mktemp("faces")
    lines = ["filename,smiling,Bald"]
    for i in range(FACES):
        data, labels = face(i, seed=3, tasks=["Smiling", NEW])
        (root / f"{i}.png").write_bytes(data)
        lines.append(f"{i}.png,{labels['Smiling']},{labels[NEW]}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def add(run: Path, out: Path, folder: Path, task: str = "bald", *more: str) -> Result:
    args = [
        "task",
        "add",
        "--run",
        str(run),
        "--task",
        task,
        "--dataset",
        "folder",
        "--data-dir",
        str(folder),
    ]
    tiny = ["--steps", "3", "--per-task", "4", "--device", "cpu"]
    return runner.invoke(app, [*args, "--out", str(out), *tiny, *more])


@pytest.fixture(scope="module")
def child(run_dir: Path, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("child") / "run"
    result = add(run_dir, out, folder)
    assert result.exit_code == 0, result.output
    assert "parameters added" in text(result)
    return out


def test_add_writes_a_child_run_with_lineage_and_metrics(run_dir: Path, child: Path) -> None:
    config = json.loads((child / "config.json").read_text())
    assert config["model"]["task_names"] == [*TASKS, NEW]  # asked for "bald": the column's own spelling
    [entry] = config["lineage"]
    parent = load_run(run_dir)
    assert entry["operation"] == "add_task" and entry["task"] == NEW
    assert entry["parent_run"] == str(run_dir.resolve()) and entry["parent_model_hash"] == parent.model_hash
    assert entry["parent_shared_fingerprint"] == parent.fingerprints.shared
    assert entry["data"]["dataset"] == "folder" and entry["data"]["tasks"] == [NEW]
    assert entry["train"]["steps"] == 3 and entry["train"]["lr"] == 0.03  # as given; the seam's default lr
    metrics = json.loads((child / "metrics.json").read_text())
    parents = json.loads((run_dir / "metrics.json").read_text())["test"]["tasks"]
    assert {t: metrics["test"]["tasks"][t] for t in TASKS} == parents
    assert 0.0 <= metrics["test"]["tasks"][NEW]["triplet_accuracy"] <= 1.0
    assert metrics["added_task"]["added"]["parameters"] == parent.model.parameter_counts()["per_task_extra"]
    assert not [p.name for p in child.parent.iterdir() if p.name.startswith(".")], "no staging left"


def test_child_embeds_old_tasks_bit_identically_and_keeps_their_fingerprints(
    run_dir: Path, child: Path
) -> None:
    parent, grown = load_run(run_dir), load_run(child)
    images = parent.preprocess.stack(
        [Image.open(io.BytesIO(face(i, seed=11)[0])).convert("RGB") for i in range(5)]
    )
    old = list(range(len(TASKS)))
    with torch.no_grad():
        assert torch.equal(grown.model.embed_tasks(images, old), parent.model.embed_tasks(images, old))
    assert grown.model_hash != parent.model_hash  # the file changed; the old tasks' fingerprints did not
    assert grown.fingerprints.shared == parent.fingerprints.shared
    assert {t: grown.fingerprints.tasks[t] for t in TASKS} == parent.fingerprints.tasks
    assert grown.fingerprints == fingerprints(grown.model)


def test_add_with_the_proxy_loss_records_it_in_the_lineage(
    run_dir: Path, folder: Path, tmp_path: Path
) -> None:
    result = add(run_dir, tmp_path / "proxy", folder, "bald", "--loss", "proxy")
    assert result.exit_code == 0, result.output
    [entry] = json.loads((tmp_path / "proxy" / "config.json").read_text())["lineage"]
    assert entry["train"]["loss"] == "proxy"
    assert load_run(tmp_path / "proxy").fingerprints.shared == load_run(run_dir).fingerprints.shared


def test_remove_round_trip_gives_back_the_parent(run_dir: Path, child: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["task", "remove", "--run", str(child), "--task", "bald", "--out", str(tmp_path / "back")]
    )
    assert result.exit_code == 0, result.output
    assert "modret index remove-task --index INDEX_DIR --task bald" in " ".join(result.output.split())
    back, parent = load_run(tmp_path / "back"), load_run(run_dir)
    assert back.task_names == TASKS and back.fingerprints == parent.fingerprints
    assert [e["operation"] for e in back.lineage] == ["add_task", "remove_task"]
    assert set(json.loads((tmp_path / "back" / "metrics.json").read_text())["test"]["tasks"]) == set(TASKS)


def test_add_errors_exit_2_with_what_to_do(run_dir: Path, folder: Path, tmp_path: Path) -> None:
    result = add(run_dir, tmp_path / "a", folder, task="Mustache")
    assert result.exit_code == 2 and "unknown task(s) Mustache; valid tasks: smiling, Bald" in text(result)
    result = add(run_dir, tmp_path / "b", folder, task="smiling")
    assert result.exit_code == 2 and "task smiling is already in" in text(result)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    result = add(run_dir, tmp_path / "full", folder)
    assert result.exit_code == 2 and "is not an empty directory: choose a new --out" in text(result)
    result = add(run_dir, run_dir, folder)
    assert result.exit_code == 2 and "is the parent run itself" in text(result)
    result = add(run_dir, tmp_path / "c", folder, "bald", "--init", "bogus")
    assert result.exit_code == 2 and "unknown init 'bogus'" in text(result)
    result = add(run_dir, tmp_path / "c", folder, "bald", "--loss", "hinge")
    assert result.exit_code == 2 and "unknown loss 'hinge'; choose one of triplet, proxy" in text(result)
    result = add(tmp_path / "nothing", tmp_path / "c", folder)
    assert result.exit_code == 2 and "config.json:notfound" in "".join(result.output.split())  # a long path
    assert not any((tmp_path / name).exists() for name in "abc"), "no run written on an error"


def test_remove_errors_exit_2(run_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["task", "remove", "--run", str(run_dir), "--task", "Nope", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "unknown task(s) Nope; the model's tasks: Smiling" in text(result)
