"""The paper's comparison: the same trainer and budget for each architecture, then one table.

Architectures: ``independent`` (one network per task), ``shared`` (no conditioning), ``mask``
(CSN-style modulation of the embedding only) and ``modulated`` (the paper).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.data.base import AttributeDataset
from model.network import Arch, ModulationInit, Neck
from model.pixels import PixelCache
from model.preprocess import Preprocess
from model.train import DataConfig, Loss, Mining, TrainConfig, train


@dataclass
class DecodedData:
    """A dataset and every one of its images decoded once at one input size, for several trainings that
    share them (``modret compare``: every architecture, from scratch and pretrained, reads the same
    pixels). The cache holds uint8 pixels, so runs with different normalisations can share it; ``features``
    holds each frozen backbone's pooled features (``model.features.FrozenFeatures``, by backbone, weights
    and normalisation), computed by the first run over that backbone and read by the others."""

    data: DataConfig
    image_size: int
    crop: float
    dataset: AttributeDataset
    pixels: PixelCache
    features: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    @classmethod
    def load(cls, data: DataConfig, image_size: int, progress: bool = True, crop: float = 1.0) -> DecodedData:
        dataset = data.load(image_size)
        everything = np.arange(len(dataset))
        pixels = PixelCache(dataset, everything, Preprocess(image_size, crop=crop), progress)
        return cls(data, image_size, crop, dataset, pixels)

    def check(self, cfg: TrainConfig) -> None:
        if cfg.data != self.data or (cfg.image_size, cfg.center_crop) != (self.image_size, self.crop):
            raise ValueError(
                f"the decoded data is {self.data} at {self.image_size} px (centre crop {self.crop:g}); "
                f"this run wants {cfg.data} at {cfg.image_size} px (centre crop {cfg.center_crop:g})"
            )


@dataclass(frozen=True)
class Budget:
    """``modret compare``'s defaults: the recipe every architecture trains with.

    Sized to about 10 minutes for shared, mask and modulated on synthetic faces on a 2-core CPU. Routes at
    every stage, batch-all mining and an lr warmup are what let the twelve tasks learn in that time; the
    official code's ones-initialised modules at stages 3, 4 and the embedding lose most tasks to the few
    with the easiest cues (docs/results.md has both).
    """

    steps: int
    width: int | None  # None: the backbone's own (a pretrained backbone's weights fit only it)
    backbone: str = "resnet18"
    image_size: int = 64
    center_crop: float = 1.0
    pretrained: str | None = None
    freeze_backbone: bool = False
    lr: float | None = None
    warmup: float = 0.25
    per_task: int = 4
    mining: Mining = "batch-all"
    modulate: tuple[str, ...] = ("1", "2", "3", "4", "emb")
    pool_grid: int = 1
    modulation_init: ModulationInit = "routing"
    neck: Neck = "batch"
    loss: Loss = "triplet"
    augment: bool = False
    crop_scale: float = 1.0
    weight_decay: float = 1e-4
    ema: float = 0.0

    def train_options(self) -> dict[str, Any]:
        """The budget as ``TrainConfig`` keyword arguments."""
        return {**asdict(self), "modulate": list(self.modulate)}


# Per-task statistics in the neck keep synthetic faces' fine-cue tasks from collapsing (mean triplet
# accuracy 0.93-0.96 at every seed measured, against 0.83-0.95 without); on real faces (CelebA, 7 tasks,
# three seeds) they cost 4 points at this budget, so real datasets keep the batch neck.
SYNTHFACES_BUDGET = Budget(steps=800, width=16, neck="task")
# Real faces keep gaining from width and steps where synthetic faces were already near their ceiling,
# and learn a little more from the proxy loss than from triplets (CelebA official 7, modulated: 0.693
# against 0.688 over two seeds at this budget, 0.671 against 0.649 at width 16) and from storing the
# weights' moving average (0.701 against 0.693 over the same two seeds; docs/results.md).
REAL_DATA_BUDGET = replace(
    SYNTHFACES_BUDGET, neck="batch", loss="proxy", width=32, steps=2400, augment=True, ema=0.998
)
# Real faces (CelebA): SFace's face-recognition trunk, pretrained and frozen, at 112 px on the centre of the
# aligned crop; the head and modules train from its pooled features, computed once for every architecture
# of a compare (model/features.py), pooled over a 3x3 grid of cells: on an aligned face a cell is a region
# (eyes, mouth, chin), which the whole map's mean blurs together. CelebA official 7, modulated: 0.737 and
# 0.740 at seeds 0 and 1 (0.724 and 0.711 with the whole map's mean; 0.700 from scratch), in a fraction of
# the time (docs/results.md).
FACE_DATASETS = ("celeba",)
FACE_BUDGET = replace(
    REAL_DATA_BUDGET, backbone="sface", pretrained="package", freeze_backbone=True, image_size=112,
    center_crop=0.7, width=None, modulate=("3", "emb"), augment=False, lr=0.1, steps=6000, pool_grid=3,
)  # fmt: skip


def compare_budget(dataset: str, backbone: str | None = None) -> Budget:
    """The budget ``modret compare`` trains ``dataset`` with (on ``backbone``, when one is asked for), for
    the options it is not given: real faces (CelebA) train over SFace's face-recognition trunk unless
    another backbone is asked for, which then trains from scratch like other real data; asking for
    ``sface`` on any dataset (a folder of face photos) is asking for the face recipe, since its weights
    are what it is for."""
    if backbone == FACE_BUDGET.backbone or (backbone is None and dataset in FACE_DATASETS):
        return FACE_BUDGET
    if dataset == "synthfaces":
        return SYNTHFACES_BUDGET
    return REAL_DATA_BUDGET


def compare(
    base: TrainConfig,
    archs: list[Arch],
    out: Path,
    progress: bool = True,
    pretrained: str | None = None,
) -> dict[str, Any]:
    """Train ``base`` once per architecture into ``out/<arch>``; returns ``{arch: eval JSON}``. With
    ``pretrained`` (``TrainConfig.pretrained``: "package" or a weights file) each architecture also trains
    from those weights into ``out/<arch>-pretrained`` (row ``<arch> pretrained``, beside its
    from-scratch row). The dataset is decoded once, for every run."""
    base.check()  # before decoding anything
    decoded = DecodedData.load(base.data, base.image_size, progress, base.center_crop)
    runs: list[tuple[str, str, TrainConfig]] = []  # (folder, row, config)
    for arch in archs:
        if pretrained is None:
            runs.append((arch, arch, replace(base, arch=arch)))
        else:
            # from scratch nothing is frozen: a random backbone's features are no one's
            runs.append((arch, arch, replace(base, arch=arch, pretrained=None, freeze_backbone=False)))
            runs.append(
                (f"{arch}-pretrained", f"{arch} pretrained", replace(base, arch=arch, pretrained=pretrained))
            )
    results: dict[str, Any] = {}
    for folder, name, cfg in runs:
        metrics = train(cfg, Path(out) / folder, progress=progress, decoded=decoded)
        seconds = {k: metrics[k] for k in ("train_seconds", "features_seconds")}
        results[name] = {**metrics["test"], **seconds}
    (Path(out) / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """Rows: architectures; columns: per-task triplet accuracy, mean metrics (leakage: ``model.evaluate``;
    "-" for results from before it was measured), parameters, seconds (training, and computing a frozen
    backbone's features where this run was the one that computed them)."""
    tasks = list(next(iter(results.values()))["tasks"])
    header = ["arch", *tasks, "mean acc", "mean mAP", "mean P@10", "mean leak", "params", "extra/task"]
    header.append("train s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arch, r in results.items():
        cells = [
            arch,
            *(f"{r['tasks'][t]['triplet_accuracy']:.3f}" for t in tasks),
            f"{r['mean']['triplet_accuracy']:.3f}",
            f"{r['mean']['map']:.3f}",
            f"{r['mean']['precision_at_10']:.3f}",
            "-" if r["mean"].get("leakage") is None else f"{r['mean']['leakage']:.3f}",
            f"{r['params']['total']:,}",
            f"{r['params']['per_task_extra']:,}",
            f"{r.get('train_seconds', 0) + r.get('features_seconds', 0):.0f}",  # a frozen backbone's too
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
