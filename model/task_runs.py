"""Child runs: a trained run plus one new task, trained only where it is new, or minus one task.

``add_task_run`` trains the new task's module rows, and nothing else, on a labelled dataset:

- every other tensor is frozen by construction: training runs on ``model.tasks.new_task``'s one-task
  model, whose only trainable tensors are the new rows (``requires_grad`` is off everywhere else and the
  optimizer holds the new rows alone, so AdamW's decoupled weight decay cannot reach anything else);
- the trunk's batch norms (and a batch neck) stay in eval mode, so they normalise by the parent's running
  statistics and never update them, as at inference; only a per-task neck (``TaskNeck``) runs in train
  mode, normalising the new task's rows by their own batch statistics as joint training did, and its
  running statistics for the new task are then estimated over the training images in eval mode;
- the trained task is joined to the parent with ``model.tasks.append_tasks``, which refuses unless the
  shared state is still bit-identical, and ``assert_extends`` checks every parent tensor once more.

When nothing before the last stage is modulated (the face recipe's ``--modulate 3,emb``), each training
image's pooled backbone output is computed once (``model.features.FrozenFeatures``) and a step costs the
head alone, as in ``--freeze-backbone`` training.

So the parent's tasks embed bit for bit as before and every index built under them stays valid. The new
run holds ``model.safetensors`` and ``config.json`` (the parent's settings, its task list grown by one,
and a ``lineage`` list: parent run, its model hash and shared fingerprint, the task and its data) and
``metrics.json`` (the new task's test metrics, the parent's for the others). ``remove_task_run`` writes a
run without one task the same way. A child run appears only once complete (written beside, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.data.base import AttributeDataset
from model.data.triplets import TripletSampler
from model.durable import fsync_path
from model.evaluate import evaluate
from model.features import FrozenFeatures, Inputs, PixelInputs
from model.network import MultiTaskEmbedder, TaskNeck
from model.pixels import PixelCache
from model.preprocess import Preprocess
from model.proxies import TaskProxies
from model.run import METRICS, LoadedRun, load_run, save_run, write_json
from model.tasks import (
    TASK_INITS,
    TaskError,
    TaskInit,
    added_parameters,
    append_tasks,
    assert_extends,
    fingerprints,
    new_task,
    per_task_keys,
    remove_task,
)
from model.train import (
    LOSSES,
    DataConfig,
    Loss,
    batch_all_triplet_loss,
    lr_factor,
    triplet_batch,
)

METRIC_NAMES = ("triplet_accuracy", "map", "precision_at_10")
# (steps, lr) of a new task's rows when not given. Through the trunk (a module before the last stage) a step
# embeds its images anew: 1,000 steps at 0.03 add a held-back synthetic-faces task in under a minute on a
# CPU. Over a pooled seam (nothing modulated before the last stage) a step costs the head alone, and over
# SFace's frozen trunk more and larger steps lifted an added Mustache from 0.94 to 0.99 of joint training
# on CelebA (docs/results.md, issue 15).
THROUGH_TRUNK_SCHEDULE: tuple[int, float] = (1000, 0.03)
POOLED_SEAM_SCHEDULE: tuple[int, float] = (4000, 0.1)


@dataclass
class TaskTrainConfig:
    """How a new task's rows are trained: batch-all triplet loss over each step's sampled images (every
    valid triplet among them), or the proxy loss over them (``model.proxies``: its proxies train beside
    the rows and are dropped after), AdamW without weight decay, a linear warmup then cosine decay."""

    steps: int | None = None  # None: the parent's seam decides (``schedule``)
    per_task: int = 16  # triplets sampled per step (their distinct images are embedded once)
    # None: as ``steps``. A few hundred parameters over a frozen trunk take larger steps than joint training.
    lr: float | None = None
    warmup: float = 0.1
    margin: float = 0.2
    seed: int = 0  # the new rows' initial routes, the triplets, and the evaluation's triplets
    # How the new rows start (model.tasks.new_task); None: as the run's own did. The mean of the run's
    # rows measured better than fresh routes for all three held-back tasks (docs/results.md, issue 15).
    init: TaskInit | None = "mean"
    loss: Loss = "triplet"
    proxy_temperature: float = 0.1

    def __post_init__(self) -> None:
        if (
            (self.steps is not None and self.steps < 1)
            or self.per_task < 1
            or not (self.lr is None or self.lr > 0)
        ):
            raise TaskError(f"steps and per_task must be at least 1 and lr positive, got {self}")
        if self.loss not in LOSSES:
            raise TaskError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if not self.proxy_temperature > 0:
            raise TaskError(f"the proxy temperature must be positive, got {self.proxy_temperature}")
        if self.init is not None and self.init not in TASK_INITS:
            raise TaskError(f"unknown init {self.init!r}; choose one of {', '.join(TASK_INITS)}")

    neck_images: int = 2000  # training images a per-task neck's statistics are estimated from

    def schedule(self, parent: MultiTaskEmbedder) -> tuple[int, float]:
        """(steps, lr) for new rows of ``parent``: the ones given, else its seam's default."""
        steps, lr = POOLED_SEAM_SCHEDULE if parent.trunk(0).pooled_seam else THROUGH_TRUNK_SCHEDULE
        return (self.steps if self.steps is not None else steps, self.lr if self.lr is not None else lr)


def _freeze(model: MultiTaskEmbedder) -> list[torch.nn.Parameter]:
    """Everything but the per-task rows frozen, norms in eval mode except a per-task neck; the rows."""
    trainable = set(per_task_keys(model))
    rows = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
        if name in trainable:
            rows.append(parameter)
    model.eval()
    for module in model.modules():
        if isinstance(module, TaskNeck):
            module.train()  # batch statistics of the new task's rows; only its own running row moves
    return rows


@torch.no_grad()
def _estimate_neck(model: MultiTaskEmbedder, inputs: Inputs, items: np.ndarray, batch: int = 256) -> None:
    """Set a one-task model's ``TaskNeck`` running statistics to the mean and unbiased variance of its
    pre-neck projections of the dataset images ``items``, computed in eval mode."""
    model.eval()
    trunk = model.trunk(0)
    if not isinstance(trunk.neck, TaskNeck):
        return
    parts = [inputs.project(model, items[i : i + batch]).float() for i in range(0, len(items), batch)]
    z = torch.cat(parts)  # (N, D)
    trunk.neck.running_mean[0] = z.mean(0)
    trunk.neck.running_var[0] = z.var(0, unbiased=True)


def train_new_task(
    parent: MultiTaskEmbedder,
    dataset: AttributeDataset,
    preprocess: Preprocess,
    cfg: TaskTrainConfig,
    split_seed: int = 0,
    progress: bool | None = None,
) -> tuple[MultiTaskEmbedder, list[dict[str, Any]]]:
    """A one-task model over ``parent``'s shared state whose rows learned ``dataset``'s one task on its
    train split; with the loss history (every 25 steps and the last)."""
    if len(dataset.task_names) != 1:
        raise TaskError(f"train one new task at a time, not {dataset.task_names}")
    show = sys.stderr.isatty() if progress is None else progress
    model = new_task(parent, dataset.task_names[0], cfg.seed, cfg.init)
    device = model.device
    train_idx = dataset.split_indices("train", split_seed)
    pixels = PixelCache(dataset, train_idx, preprocess, show)
    # Everything before the new rows is frozen, so over a pooled seam (nothing modulated before the last
    # stage) each training image's pooled backbone output is computed once, not at every step.
    inputs: Inputs = (
        FrozenFeatures(model, pixels, train_idx, preprocess, show)
        if model.trunk(0).pooled_seam
        else PixelInputs(pixels, preprocess, augment=False, crop_scale=1.0)
    )
    sampler = TripletSampler(dataset.labels, train_idx, cfg.per_task, seed=cfg.seed)
    rows = _freeze(model)
    proxies = None
    if cfg.loss == "proxy":
        dim = model.config.embedding_dim
        proxies = TaskProxies([dataset.tasks[0].num_values], dim, cfg.proxy_temperature).to(device)
        rows = [*rows, *proxies.parameters()]
    steps, lr = cfg.schedule(parent)
    optimizer = torch.optim.AdamW(rows, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(steps, cfg.warmup))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    history: list[dict[str, Any]] = []
    for step in tqdm(range(1, steps + 1), desc=f"train {dataset.task_names[0]}", disable=not show):
        items, _ = triplet_batch(sampler.sample())
        unique = np.unique(items)
        ids = torch.zeros(len(unique), dtype=torch.long, device=device)
        with amp:
            embeddings = inputs.embed(model, unique, ids, True)  # (U, D)
        values = torch.from_numpy(dataset.labels[unique, 0]).to(device).unsqueeze(0)  # (1, U)
        grouped = embeddings.float().unsqueeze(0)  # (U, D) -> (1, U, D): one task
        if proxies is not None:
            loss = proxies(grouped, values, np.zeros(1, dtype=np.int64))
        else:
            loss = batch_all_triplet_loss(grouped, values, cfg.margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 25 == 0 or step == steps:
            history.append({"step": step, "loss": round(loss.item(), 5)})
    rng = np.random.default_rng(cfg.seed)
    chosen = np.sort(rng.choice(len(train_idx), min(cfg.neck_images, len(train_idx)), replace=False))
    _estimate_neck(model, inputs, train_idx[chosen])
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model.eval(), history


def _parent_metrics(run: LoadedRun) -> dict[str, Any]:
    try:
        data: Any = json.loads((run.run_dir / METRICS).read_text())
        return dict(data["test"]["tasks"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _test_block(tasks: dict[str, Any], model: MultiTaskEmbedder) -> dict[str, Any]:
    """metrics.json's ``test`` block over ``tasks`` (each measured where it was trained)."""
    complete = [m for m in tasks.values() if all(k in m for k in METRIC_NAMES)]
    mean = {k: round(float(np.mean([m[k] for m in complete])), 4) for k in METRIC_NAMES} if complete else {}
    return {"tasks": tasks, "mean": mean, "params": model.parameter_counts(), "split": "test"}


def _write_child(
    parent: LoadedRun,
    model: MultiTaskEmbedder,
    out: Path,
    entry: dict[str, Any],
    metrics: dict[str, Any],
    new_values: dict[str, list[str]] | None = None,
) -> None:
    """Write the child run into a new directory beside ``out``, then rename it to ``out``;
    ``new_values``: the label names of tasks the child adds (``task_values`` keeps the kept tasks')."""
    lineage = [*parent.config.get("lineage", []), entry]
    # The parent's settings, its preprocessing among them (save_run's own default may differ from it).
    extra = {k: v for k, v in parent.config.items() if k not in ("format_version", "model")}
    extra["lineage"] = lineage
    values = {**parent.config.get("task_values", {}), **(new_values or {})}
    extra["task_values"] = {t: values[t] for t in model.config.task_names if t in values}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_run(staging, model, extra)
        write_json(staging / METRICS, metrics)
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the run from a service running as another user
        os.replace(staging, out)  # fails, leaving ``out`` alone, if it appeared meanwhile with files in it
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(out.parent)


def check_out(run_dir: Path, out: Path) -> None:
    """Refuse to write a child run over its parent or into a directory that holds files."""
    if out.resolve() == Path(run_dir).resolve():
        raise TaskError(f"--out {out} is the parent run itself: write the child to a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TaskError(f"{out} already exists and is not an empty directory: choose a new --out")


def _lineage(parent: LoadedRun, operation: str, task: str) -> dict[str, Any]:
    return {
        "operation": operation,
        "task": task,
        "parent_run": str(parent.run_dir.resolve()),
        "parent_model_hash": parent.model_hash,
        "parent_shared_fingerprint": fingerprints(parent.model).shared,
    }


def add_task_run(
    run_dir: Path,
    data: DataConfig,
    out: Path,
    cfg: TaskTrainConfig | None = None,
    device: str = "cpu",
    progress: bool | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Add ``data``'s one task (``data.tasks == [NAME]``) to the run at ``run_dir``, writing ``out``;
    returns the report (also in ``out/metrics.json`` under ``added_task``)."""
    cfg = cfg or TaskTrainConfig()
    out = Path(out)
    check_out(run_dir, out)
    if not data.tasks or len(data.tasks) != 1:
        raise TaskError(f"name exactly one task to add, got {data.tasks}")
    parent = load_run(run_dir, device)
    steps, lr = cfg.schedule(parent.model)
    cfg = replace(cfg, steps=steps, lr=lr)  # the lineage and the report record what trained
    requested = data.tasks[0]
    if requested.casefold() in {t.casefold() for t in parent.task_names}:
        raise TaskError(f"task {requested} is already in {run_dir} (tasks: {', '.join(parent.task_names)})")
    started = time.perf_counter()
    dataset = data.load(parent.preprocess.image_size)
    name = dataset.task_names[0]  # the dataset's spelling
    say(f"training {name}'s rows on {len(dataset)} {data.dataset} images, everything else frozen")
    single, history = train_new_task(parent.model, dataset, parent.preprocess, cfg, data.seed, progress)
    child = append_tasks(parent.model, single)
    assert_extends(parent.model, child)
    train_seconds = time.perf_counter() - started
    say(f"evaluating {name} on the test split")
    test = evaluate(single, dataset, parent.preprocess, seed=cfg.seed, split_seed=data.seed)
    report = {
        "task": name,
        "test": test,
        "added": added_parameters(parent.model, child),
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
        "history": history,
        "config": asdict(cfg),
    }
    tasks = {**_parent_metrics(parent), name: test["tasks"][name]}
    entry = {
        **_lineage(parent, "add_task", name),
        "data": {**asdict(data), "tasks": [name]},
        "train": asdict(cfg),
    }
    metrics = {"test": _test_block(tasks, child), "added_task": report}
    _write_child(parent, child, out, entry, metrics, {name: list(dataset.tasks[0].values)})
    return report


def remove_task_run(run_dir: Path, task: str, out: Path, device: str = "cpu") -> list[str]:
    """Write ``out``: the run at ``run_dir`` without ``task``; returns the tasks it keeps."""
    out = Path(out)
    check_out(run_dir, out)
    parent = load_run(run_dir, device)
    child = remove_task(parent.model, task)
    assert_extends(child, parent.model)  # every kept task's rows and the shared state, bit for bit
    removed = next(t for t in parent.task_names if t not in child.config.task_names)
    kept = {k: v for k, v in _parent_metrics(parent).items() if k != removed}
    _write_child(
        parent, child, out, _lineage(parent, "remove_task", removed), {"test": _test_block(kept, child)}
    )
    return list(child.config.task_names)
