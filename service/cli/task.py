"""``modret task``: grow a trained run by one task, or shrink it by one, without retraining the rest.

- ``add --run RUN --task NAME --dataset folder|celeba|synthfaces [--data-dir DIR] --out NEWRUN
  [--steps N]`` trains only the new task's module rows (``model.task_runs``); the other tasks of NEWRUN
  embed bit for bit as in RUN, so every index built under them stays valid.
- ``remove --run RUN --task NAME --out NEWRUN`` writes RUN without the task; ``modret index remove-task``
  drops the task's index from a gallery (until then a service of NEWRUN serves the gallery but refuses
  uploads, which cannot be embedded under the removed task).

Exit codes: ``service.cli.common`` (2 for any error: a missing run, an unknown task column, a task
already in the run, an --out that holds files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.common import DeviceOpt, console, fail

task_app = typer.Typer(help="Add a task to a trained run (training only its modules) or remove one.")

RunOpt = Annotated[Path, typer.Option(help="the trained run directory (model.safetensors + config.json)")]
OutOpt = Annotated[Path, typer.Option(help="new run directory to write (must not hold files)")]


@task_app.command()
def add(
    run: RunOpt,
    task: Annotated[str, typer.Option(help="the new task: a column of the dataset's labels")],
    out: OutOpt,
    dataset: Annotated[str, typer.Option(help="folder (labels.csv) | celeba | synthfaces | utzappos")],
    data_dir: Annotated[
        Path | None, typer.Option(help="the dataset's files (not needed for synthfaces)")
    ] = None,
    num_images: Annotated[int | None, typer.Option(help="synthfaces count / real-data subsample")] = None,
    data_seed: Annotated[int, typer.Option(help="dataset generation and split seed")] = 0,
    steps: Annotated[
        int | None,
        typer.Option(
            help="training steps (default 1000; 4000 when the run modulates nothing before its last "
            "stage, where a step costs the head alone)"
        ),
    ] = None,
    per_task: Annotated[int | None, typer.Option(help="triplets sampled per step (default 16)")] = None,
    lr: Annotated[
        float | None, typer.Option(help="AdamW learning rate (default 0.03; 0.1 where steps default to 4000)")
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(help="mean (of the run's rows; the default) | identity | routing (fresh routes)"),
    ] = None,
    loss: Annotated[
        str | None, typer.Option(help="triplet (the default) | proxy (a softmax over the values' proxies)")
    ] = None,
    seed: Annotated[int, typer.Option(help="the new rows' routes, the triplets")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Train a new task's modules on a frozen run and write the run with it added."""
    from dataclasses import replace

    from model.data.base import DataFormatError
    from model.run import RunError
    from model.task_runs import TaskTrainConfig, add_task_run
    from model.train import DataConfig

    given: dict[str, Any] = {"steps": steps, "per_task": per_task, "lr": lr, "init": init, "loss": loss}
    data = DataConfig(dataset, str(data_dir) if data_dir else None, [task], num_images, data_seed)
    try:
        cfg = replace(TaskTrainConfig(seed=seed), **{k: v for k, v in given.items() if v is not None})
        report = add_task_run(run, data, out, cfg, device=device, say=console.print)
    except (DataFormatError, RunError, ValueError) as exc:  # TaskError is a ValueError
        raise fail(str(exc)) from exc
    metrics = report["test"]["tasks"][report["task"]]
    added = report["added"]
    console.print(
        f"{report['task']}: test triplet accuracy {metrics['triplet_accuracy']:.3f}, "
        f"mAP {metrics['map']:.3f}, P@10 {metrics['precision_at_10']:.3f}; "
        f"{added['parameters']:,} parameters added"
        + (f" (+ {added['buffers']:,} neck statistics)" if added["buffers"] else "")
        + f", {report['seconds']:.0f} s"
    )
    console.print(f"wrote {out} (the other tasks embed exactly as in {run})")


@task_app.command()
def remove(
    run: RunOpt,
    task: Annotated[str, typer.Option(help="the task to drop")],
    out: OutOpt,
) -> None:
    """Write the run without one task (the others keep their modules bit for bit)."""
    from model.run import RunError
    from model.task_runs import remove_task_run

    try:
        kept = remove_task_run(run, task, out)
    except (RunError, ValueError) as exc:
        raise fail(str(exc)) from exc
    console.print(f"wrote {out} with tasks {', '.join(kept)}")
    console.print(
        f"a gallery that indexes {task}: drop its index with "
        f"`modret index remove-task --index INDEX_DIR --task {task}` before serving it with {out}",
        soft_wrap=True,
    )
