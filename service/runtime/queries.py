"""Parsing the ``task`` and ``filter`` query parameters.

``task`` repeats: ``Smiling``, ``Smiling:1``, ``Black_Hair:0.5``, ``Eyeglasses:-1``. Names match
case-insensitively; an unknown name is ``UnknownTask`` with the valid ones listed; a name given twice, a
missing or non-finite or zero weight is ``InvalidQuery``. ``filter`` repeats as ``Label:value``; the value
is a label's name as the gallery stores it (``model.data.base.as_label_value``: ``Smiling:1``,
``colour:green``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from model.data.base import LabelValue, as_label_value, label_problem
from service.runtime.errors import InvalidQuery, UnknownTask

_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # what people write: no 1_0, no spaces
_DIGITS = re.compile(r"^[0-9]{1,19}$")
MAX_WEIGHT = 1000.0
MIN_WEIGHT = 1e-3  # in size: smaller weights scale every score towards 0 (float32 scores end in ties)


@dataclass(frozen=True)
class WeightedTask:
    name: str  # canonical spelling
    index: int  # position in the model's task list
    weight: float


def resolve_task(name: str, known: Sequence[str]) -> str:
    """The canonical spelling of ``name`` (case-insensitive), or ``UnknownTask`` listing the valid ones."""
    lookup = {task.lower(): task for task in known}
    canonical = lookup.get(name.strip().lower())
    if canonical is None:
        raise UnknownTask(name, known)
    return canonical


def _invalid(message: str) -> InvalidQuery:
    return InvalidQuery(message)


def plain_id(value: object) -> object:
    """An image id given as text is its decimal digits only: ``1.0``, ``+1``, `` 1`` or ``1e0`` are not
    the image 1 (pydantic's lax integers would take them). For ``BeforeValidator``."""
    if isinstance(value, str) and not _DIGITS.match(value):
        raise ValueError("an image id is a whole number written in digits only, e.g. 42")
    return value


def parse_tasks(specs: Sequence[str], known: Sequence[str]) -> list[WeightedTask]:
    if not specs:
        raise _invalid(f"give at least one task, e.g. ?task={known[0]}")
    if len(specs) > len(known):
        raise _invalid(f"at most {len(known)} tasks per query, got {len(specs)}")
    out: list[WeightedTask] = []
    seen: set[str] = set()
    for spec in specs:
        name, sep, weight_text = spec.partition(":")
        canonical = resolve_task(name, known)
        weight = 1.0
        if sep:
            if not _NUMBER.match(weight_text):
                raise _invalid(f"task weight must be a number: {spec!r} (use Task:0.5)")
            weight = float(weight_text)
            if not math.isfinite(weight) or not MIN_WEIGHT <= abs(weight) <= MAX_WEIGHT:
                raise _invalid(
                    f"task weight must be between {MIN_WEIGHT:g} and {MAX_WEIGHT:g} in size "
                    f"(negative: unlike the query): {spec!r}"
                )
        if canonical in seen:
            raise _invalid(f"task {canonical!r} given more than once; give each task once with its weight")
        seen.add(canonical)
        out.append(WeightedTask(canonical, list(known).index(canonical), weight))
    return out


def describe(tasks: Sequence[WeightedTask]) -> str:
    """``Smiling`` for one task of weight 1, else ``Smiling:1,Eyeglasses:-1``."""
    if len(tasks) == 1 and tasks[0].weight == 1.0:
        return tasks[0].name
    return ",".join(f"{t.name}:{t.weight:g}" for t in tasks)


def parse_filters(specs: Sequence[str]) -> dict[str, LabelValue]:
    conditions: dict[str, LabelValue] = {}
    for spec in specs:
        name, sep, text = spec.partition(":")
        if not sep or not _LABEL.match(name):
            raise _invalid(f"filter must look like Label:value (Smiling:1, colour:green), got {spec!r}")
        value = as_label_value(text)
        problem = label_problem(value)
        if problem is not None:
            raise _invalid(f"filter {spec!r}: {problem}")
        if name in conditions and conditions[name] != value:
            raise _invalid(f"label {name!r} filtered with two different values")
        conditions[name] = value
    return conditions
