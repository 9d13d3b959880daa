"""A model's tasks as separable state: select, append and fingerprint tasks without touching the rest.

In a modulated (or mask) network every tensor that depends on the task is indexed by it along its
first dimension: the modulation modules' weights (``(T, C)`` factors or ``(T, C, C)`` projections) and,
with a per-task neck, ``TaskNeck``'s running statistics (``(T, D)`` buffers). Everything else (the
trunk's convolutions and batch norms, the projection, a batch neck, the neck's shared affine) is
*shared*: it serves every task. Task ``t`` therefore embeds with the shared state plus row ``t`` of
each per-task tensor and nothing else, so

- ``select_tasks`` builds a model of some of the tasks (in any order) whose tasks embed exactly as
  before: removing a task, or isolating one to train or evaluate it, copies rows bit for bit;
- ``append_tasks`` joins a model and another that shares its shared state bit for bit (checked), with
  the other's tasks after the first's: adding a trained task;
- ``new_task`` is a one-task model over a model's shared state whose rows are what the modules'
  constructors initialise (ones / identity, or seeded random routes), the start of training a task;
- ``fingerprints`` hashes the shared state once and each task's rows (with the shared hash), so an index
  built under task ``t`` can tell whether a run still embeds ``t`` exactly as when it was built.

An ``independent`` network (one trunk per task) has no shared state: its tasks are whole trunks; it can
be selected and fingerprinted, but a task cannot be added to it without training a network.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from model.network import (
    MODULATION_MODULES,
    ModelConfig,
    ModulationInit,
    MultiTaskEmbedder,
    TaskNeck,
    create_model,
)

# The tensors of each module kind whose first dimension is the task.
PER_TASK_STATE: dict[type[nn.Module], tuple[str, ...]] = {
    **{module: ("weight",) for module in MODULATION_MODULES.values()},
    TaskNeck: ("running_mean", "running_var"),
}
# How a new task's rows start: as the modules' constructors start them, or at the mean of the model's.
TaskInit = Literal["identity", "routing", "mean"]
TASK_INITS: tuple[TaskInit, ...] = ("identity", "routing", "mean")
# Config fields that name or start the tasks rather than shape the function every task shares.
_NOT_SHARED = ("task_names", "modulation_init")


class TaskError(ValueError):
    """A task operation that cannot be done as asked; the message says why and what to do instead."""


@dataclass(frozen=True)
class Fingerprints:
    """sha256 hex digests: ``shared`` of the shared state and the architecture, ``tasks[name]`` of that
    task's rows together with ``shared`` (so one task's digest alone identifies its whole embedding)."""

    shared: str
    tasks: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"shared": self.shared, "tasks": dict(self.tasks)}


@dataclass
class _Split:
    """A model's state dict cut into the shared entries and each task's own."""

    shared: dict[str, Tensor]
    tasks: list[dict[str, Tensor]]  # per task: its rows (row archs) or its trunk's entries (independent)


def per_task_keys(model: MultiTaskEmbedder) -> list[str]:
    """State-dict keys of the tensors indexed by task along dimension 0 (empty for independent/shared)."""
    if model.config.arch == "independent":
        return []
    return [
        f"{name}.{attr}"
        for name, module in model.named_modules()
        for attr in PER_TASK_STATE.get(type(module), ())
    ]


def _split(model: MultiTaskEmbedder) -> _Split:
    state = model.state_dict()
    if model.config.arch == "independent":
        tasks = [
            {key.split(".", 2)[2]: value for key, value in state.items() if key.startswith(f"trunks.{t}.")}
            for t in range(model.num_tasks)
        ]
        return _Split({}, tasks)
    keys = per_task_keys(model)
    shared = {key: value for key, value in state.items() if key not in keys}
    return _Split(shared, [{key: state[key][t] for key in keys} for t in range(model.num_tasks)])


def _build(
    config: ModelConfig, shared: dict[str, Tensor], tasks: Sequence[dict[str, Tensor]]
) -> MultiTaskEmbedder:
    """A model of ``config`` holding exactly these tensors (copied), in eval mode, on their device."""
    if config.arch == "independent":
        state = {f"trunks.{t}.{key}": value for t, rows in enumerate(tasks) for key, value in rows.items()}
    else:
        state = dict(shared)
        state.update({key: torch.stack([rows[key] for rows in tasks]) for key in tasks[0]})
    state = {key: value.detach().clone() for key, value in state.items()}
    # Built on the meta device, then given these tensors: no initialisation (and no random draws) wasted.
    with torch.device("meta"):
        model = create_model(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _positions(model: MultiTaskEmbedder, names: Sequence[str]) -> list[int]:
    known = {name.casefold(): i for i, name in enumerate(model.config.task_names)}
    unknown = [name for name in names if name.casefold() not in known]
    if unknown:
        raise TaskError(
            f"unknown task(s) {', '.join(unknown)}; the model's tasks: {', '.join(model.config.task_names)}"
        )
    return [known[name.casefold()] for name in names]


def select_tasks(model: MultiTaskEmbedder, names: Sequence[str]) -> MultiTaskEmbedder:
    """A model of the tasks ``names`` (matched case-insensitively, in this order): the shared state and
    their rows copied bit for bit, so each embeds exactly as in ``model``."""
    if not names:
        raise TaskError("a model needs at least one task: name one to keep")
    ids = _positions(model, names)
    if len(set(ids)) != len(ids):
        raise TaskError(f"task(s) named twice in {list(names)}")
    parts = _split(model)
    config = replace(model.config, task_names=[model.config.task_names[i] for i in ids])
    return _build(config, parts.shared, [parts.tasks[i] for i in ids])


def remove_task(model: MultiTaskEmbedder, name: str) -> MultiTaskEmbedder:
    """``model`` without the task ``name``; the others keep their rows and order."""
    drop = _positions(model, [name])[0]
    keep = [t for i, t in enumerate(model.config.task_names) if i != drop]
    if not keep:
        raise TaskError(f"{name} is the model's only task; a model needs at least one")
    return select_tasks(model, keep)


def _addable(model: MultiTaskEmbedder) -> None:
    arch = model.config.arch
    if arch == "independent":
        raise TaskError("an independent network has no shared weights to reuse: train a network for the task")
    if not per_task_keys(model):
        raise TaskError(
            f"the {arch} architecture has no per-task modules to train: its embedding serves every task"
        )


def _comparable(config: ModelConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_SHARED}


def _bits(value: Tensor) -> Tensor:
    """A tensor's bytes as a flat uint8 tensor on the CPU (NaN equals NaN, -0.0 differs from 0.0)."""
    return value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _same_shared(a: dict[str, Tensor], b: dict[str, Tensor]) -> list[str]:
    """Keys whose tensors differ in any bit (or in dtype or shape), or are in one state only."""
    differ = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(_bits(x), _bits(y)):
            differ.append(key)
    return differ


def append_tasks(model: MultiTaskEmbedder, extra: MultiTaskEmbedder) -> MultiTaskEmbedder:
    """``model``'s tasks then ``extra``'s, over the shared state both hold: ``extra`` must have been made
    from ``model`` (``new_task``, then trained with the shared state frozen). Raises ``TaskError`` when a
    name is in both, the architectures differ, or any shared tensor differs in any bit."""
    _addable(model)
    clash = [
        t for t in extra.config.task_names if t.casefold() in {n.casefold() for n in model.config.task_names}
    ]
    if clash:
        raise TaskError(
            f"task(s) {', '.join(clash)} already in the model; remove them first or pick a new name"
        )
    if _comparable(model.config) != _comparable(extra.config):
        raise TaskError(
            "the two models have different architectures; a task moves only between related models"
        )
    base, more = _split(model), _split(extra)
    differ = _same_shared(base.shared, more.shared)
    if differ:
        raise TaskError(
            f"shared weights differ in {len(differ)} tensor(s), first {differ[0]}: the task was not trained "
            "on this model (or its shared weights moved while training)"
        )
    config = replace(model.config, task_names=[*model.config.task_names, *extra.config.task_names])
    return _build(config, base.shared, [*base.tasks, *more.tasks])


def new_task(
    model: MultiTaskEmbedder, name: str, seed: int = 0, init: TaskInit | None = None
) -> MultiTaskEmbedder:
    """A one-task model named ``name`` over ``model``'s shared state (copied), with fresh rows.

    ``init``: ``identity`` or ``routing`` (routes drawn from ``seed``) start the rows as the modules'
    constructors do (default: the model's own ``modulation_init``); ``mean`` starts each module's row at
    the mean of the model's rows, the operating point the frozen trunk was trained around (a channel no
    task uses stays off). A per-task neck's statistics start at the constructor's either way. The config
    keeps the model's ``modulation_init``, which says how its own rows started.
    """
    _addable(model)
    if init is not None and init not in TASK_INITS:
        raise TaskError(f"unknown init {init!r}; choose one of {', '.join(TASK_INITS)}")
    parts = _split(model)
    config = replace(model.config, task_names=[name])
    start = config.modulation_init if init in (None, "mean") else init
    with torch.random.fork_rng(devices=[]):  # seeded routes, the caller's random stream untouched
        torch.manual_seed(seed)
        fresh = _split(create_model(replace(config, modulation_init=cast(ModulationInit, start))))
    device = next(iter(parts.shared.values())).device
    rows = {key: value.to(device) for key, value in fresh.tasks[0].items()}
    if init == "mean":
        parameters = {key for key, _ in model.named_parameters()}
        for key in rows.keys() & parameters:
            rows[key] = torch.stack([task[key] for task in parts.tasks]).mean(0)
    return _build(config, parts.shared, [rows])


def assert_extends(parent: MultiTaskEmbedder, child: MultiTaskEmbedder) -> None:
    """Raise ``TaskError`` unless ``child`` holds ``parent``'s shared state and every parent task's rows
    bit for bit (tasks matched by name; the child may hold more)."""
    mine, theirs = _split(child), _split(parent)
    differ = _same_shared(theirs.shared, mine.shared)
    ids = _positions(child, parent.config.task_names)
    for name, old, t in zip(parent.config.task_names, theirs.tasks, ids, strict=True):
        differ += [f"{name}: {key}" for key in _same_shared(old, mine.tasks[t])]
    if differ:
        raise TaskError(f"{len(differ)} tensor(s) changed from the parent model, first {differ[0]}")


def _digest(tensors: dict[str, Tensor], prefix: str = "") -> str:
    digest = hashlib.sha256(prefix.encode())
    for key in sorted(tensors):
        value = tensors[key]
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(_bits(value).numpy().tobytes())
    return digest.hexdigest()


def fingerprints(model: MultiTaskEmbedder) -> Fingerprints:
    """The shared state's digest (with the architecture) and one per task (its rows and the shared one)."""
    parts = _split(model)
    architecture = json.dumps(_comparable(model.config), sort_keys=True)
    shared = _digest(parts.shared, architecture)
    tasks = {
        name: _digest(rows, shared) for name, rows in zip(model.config.task_names, parts.tasks, strict=True)
    }
    return Fingerprints(shared, tasks)


def added_parameters(parent: MultiTaskEmbedder, child: MultiTaskEmbedder) -> dict[str, int]:
    """How much ``child`` holds beyond ``parent``: trainable parameters and per-task buffers (elements)."""
    keys = set(per_task_keys(child))
    parameter_names = {name for name, _ in child.named_parameters()}
    rows = _split(child).tasks[parent.num_tasks :]
    counts = {"parameters": 0, "buffers": 0}
    for task_rows in rows:
        for key, value in task_rows.items():
            if key in keys:
                counts["parameters" if key in parameter_names else "buffers"] += value.numel()
    return counts
