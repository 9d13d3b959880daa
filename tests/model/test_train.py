"""Training: run-directory contents, metrics, learning, and exact resumption after a kill."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.network import create_model
from model.run import load_run
from model.train import (
    CHECKPOINT,
    LOSSES,
    MINING,
    DataConfig,
    TrainConfig,
    batch_all_triplet_loss,
    lr_factor,
    resume_config,
    train,
)
from tests.factories import tiny_train_config

TASKS = ["Pale_Skin", "Wearing_Hat", "Eyeglasses"]


def tiny_config(**kw: object) -> TrainConfig:
    """The factory's tiny training over ``TASKS`` on 150 synthetic faces (the resume test counts on it)."""
    return tiny_train_config(**{"data": DataConfig(tasks=TASKS, num_images=150), **kw})


def test_train_writes_a_loadable_run_with_metrics(tmp_path):
    metrics = train(tiny_config(), tmp_path, progress=False)
    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", "config.json", "metrics.json"}
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["test"]["tasks"].keys() == set(TASKS)
    assert set(on_disk["test"]["mean"]) == {"triplet_accuracy", "map", "precision_at_10", "leakage"}
    assert metrics["history"][-1]["step"] == 6 and metrics["images_per_second"] > 0
    run = load_run(tmp_path)
    assert run.task_names == TASKS
    assert run.config["train"]["steps"] == 6 and run.config["dataset"]["tasks"] == TASKS


def test_training_learns_easy_attributes(tmp_path):
    cfg = tiny_config(steps=30, per_task=8, lr=1e-2, data=DataConfig(tasks=["Pale_Skin"], num_images=300))
    metrics = train(cfg, tmp_path, progress=False)
    assert metrics["test"]["mean"]["triplet_accuracy"] > 0.8, metrics["test"]


def _train_in_subprocess(out: Path, cfg: TrainConfig, resume: bool = False) -> subprocess.Popen[bytes]:
    # Every run of this test trains in a fresh process: in-process state left by other tests (OpenMP
    # thread counts set by faiss, say) changes float reduction order and so the weights.
    code = (
        "import sys, json; from pathlib import Path; import torch; "
        "from model.train import TrainConfig, train; torch.use_deterministic_algorithms(True); "
        "train(TrainConfig.from_dict(json.loads(sys.argv[1])), Path(sys.argv[2]), resume=sys.argv[3] == '1', "
        "progress=False)"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(cfg.to_dict()), str(out), str(int(resume))]
    )


RESUMABLE = [{"loss": loss} for loss in LOSSES] + [{"ema": 0.9, "crop_scale": 0.8, "augment": True}]


@pytest.mark.parametrize("options", RESUMABLE, ids=lambda o: ",".join(map(str, o.values())))
def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path, options):
    # 12 steps, 3 per epoch (150 images * 0.8 / (3 tasks * 12 triplets)) -> checkpoints at 3, 6, 9, 12
    # (the proxy loss's proxies and the weights' moving average are checkpointed too, or the resumed
    # run would restart them)
    cfg = tiny_config(steps=12, per_task=12, **options)
    assert _train_in_subprocess(tmp_path / "straight", cfg).wait() == 0

    killed = tmp_path / "killed"
    proc = _train_in_subprocess(killed, cfg)
    deadline = time.monotonic() + 120
    while not (killed / CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / CHECKPOINT).exists()
    resumed = resume_config(killed, None, None)
    assert resumed == cfg
    assert _train_in_subprocess(killed, resumed, resume=True).wait() == 0

    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(
            a[name], b[name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_the_run_stores_the_moving_average_of_the_weights(tmp_path):
    # At decay 0.99 over 6 steps the average is 95 % the weights after the first step: the stored run
    # stays much nearer its initialisation than the same trajectory's last step does.
    cfg = tiny_config()
    train(cfg, tmp_path / "plain", progress=False)
    train(replace(cfg, ema=0.99), tmp_path / "ema", progress=False)
    torch.manual_seed(cfg.seed)
    start = create_model(cfg.model_config(TASKS)).state_dict()
    last = load_file(str(tmp_path / "plain" / "model.safetensors"))
    averaged = load_file(str(tmp_path / "ema" / "model.safetensors"))
    trained = [k for k in last if last[k].is_floating_point() and not torch.equal(last[k], start[k])]
    assert trained

    def moved(weights: dict[str, torch.Tensor]) -> float:
        return sum(float((weights[k] - start[k]).norm()) for k in trained)

    assert moved(averaged) < 0.5 * moved(last)
    assert load_run(tmp_path / "ema").config["train"]["ema"] == 0.99


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ema", 1.0), ("ema", -0.1), ("crop_scale", 0.0), ("crop_scale", 1.2), ("steps", 0), ("steps", -5),
        ("epochs", 0), ("per_task", 0), ("lr", 0.0), ("lr", -1e-3), ("warmup", 1.0), ("warmup", -0.1),
        ("image_size", 4), ("width", 0), ("embedding_dim", 0), ("weight_decay", -1.0), ("margin", -0.2),
        ("proxy_temperature", 0.0),
    ],
)  # fmt: skip
def test_out_of_range_options_are_clear_errors_before_any_work(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        train(tiny_config(**{field: value}), tmp_path, progress=False)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        resume_config(tmp_path, None, None)


def test_unknown_task_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Nope"):
        train(tiny_config(data=DataConfig(tasks=["Nope"])), tmp_path, progress=False)


def _brute_force_batch_all(e: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    losses = []
    for a in range(len(y)):
        for p in range(len(y)):
            for n in range(len(y)):
                if a != p and y[a] == y[p] != -1 and y[n] != -1 and y[n] != y[a]:
                    d_ap = (e[a] - e[p]).pow(2).sum()
                    d_an = (e[a] - e[n]).pow(2).sum()
                    losses.append(torch.relu(d_ap - d_an + margin))
    active = [v for v in losses if v > 1e-12]
    return torch.stack(active).sum() / max(1, len(active))


def test_batch_all_loss_matches_a_brute_force_enumeration(monkeypatch):
    torch.manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(2, 9, 4), dim=2)
    y = torch.tensor([[0, 1, 1, 0, 2, -1, 2, 0, 1], [1, 1, 0, 0, -1, -1, 1, 0, 0]])
    expected = torch.stack([_brute_force_batch_all(e[t], y[t], 0.2) for t in range(2)]).mean()
    torch.testing.assert_close(batch_all_triplet_loss(e, y, 0.2), expected, atol=1e-6, rtol=1e-5)
    monkeypatch.setattr("model.train._CUBE_LIMIT", 1)  # one anchor per block: same sum, less memory
    torch.testing.assert_close(batch_all_triplet_loss(e, y, 0.2), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mining", MINING)
def test_every_mining_mode_trains(tmp_path, mining):
    metrics = train(tiny_config(mining=mining, steps=3), tmp_path, progress=False)
    losses = [h["loss"] for h in metrics["history"]]
    assert metrics["steps"] == 3 and losses and all(math.isfinite(v) for v in losses)
    # A mining mode that found no triplet would train on a loss of exactly 0 (no gradient at all).
    assert max(losses) > 0


def test_lr_ramps_up_over_the_warmup_then_decays_to_zero():
    factor = lr_factor(100, 0.2)
    values = [factor(step) for step in range(101)]
    assert values[0] == pytest.approx(0.05, abs=1e-9)  # step 1 of a 20-step ramp
    assert all(a < b for a, b in pairwise(values[:20]))
    assert max(values) == pytest.approx(values[19], abs=1e-9) and values[19] > 0.9
    assert all(a >= b for a, b in pairwise(values[19:]))
    assert values[100] == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(100, 0.0)(0) == pytest.approx(1.0, abs=1e-12)  # no warmup: cosine from the start


@pytest.mark.parametrize(
    "options, warns",
    [
        ({"neck": "task", "mining": "batch-all", "per_task": 2}, True),  # 6 rows per task
        ({"neck": "task", "mining": "batch-all", "per_task": 4}, False),  # 12 rows
        ({"neck": "task", "mining": "all-tasks", "per_task": 2}, False),  # every image under every task
        ({"neck": "batch", "mining": "batch-all", "per_task": 2}, False),
    ],
)
def test_thin_per_task_statistics_are_warned_about(tmp_path, options, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_config(steps=1, **options), tmp_path, progress=False)
    messages = [str(w.message) for w in caught if "--neck task" in str(w.message)]
    assert bool(messages) == warns, messages
    if warns:
        assert "6 rows" in messages[0] and "--per-task 4" in messages[0]


def test_routing_init_and_task_neck_are_saved_with_the_run(tmp_path):
    train(tiny_config(modulation_init="routing", neck="task", steps=2), tmp_path, progress=False)
    run = load_run(tmp_path)
    assert run.config["train"]["modulation_init"] == "routing" and run.config["train"]["neck"] == "task"
    assert run.model.config.modulation_init == "routing" and run.model.config.neck == "task"
    running = run.model.trunk(0).neck.running_var  # per-task statistics learned in training, restored
    assert running.shape[0] == len(run.task_names) and not (running == 1).all()
