"""Label values as a gallery stores them: names, integers when they spell one."""

from __future__ import annotations

import pytest

from model.data.base import MAX_LABEL_TEXT, TaskSpec, as_label_value, label_problem


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", 1),
        (" -3 ", -3),
        ("+7", 7),
        ("0", 0),
        ("green", "green"),
        (" dark green ", "dark green"),
        ("1.5", "1.5"),
        ("1_000", "1_000"),  # int() would read these two as numbers; they are names
        ("\uff11", "\uff11"),  # a fullwidth 1
    ],
)
def test_as_label_value(text: str, value: int | str) -> None:
    assert as_label_value(text) == value and type(as_label_value(text)) is type(value)


def test_task_spec_label_value_names_binary_as_integers() -> None:
    assert TaskSpec("Smiling", ("0", "1")).label_value(1) == 1
    assert TaskSpec("colour", ("blue", "green")).label_value(1) == "green"
    assert TaskSpec("size", ("10", "8")).label_value(0) == 10


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (True, "integer or a text"),
        (1.5, "integer or a text"),
        (None, "integer or a text"),
        (2**63, "64 bits"),
        ("", "empty"),
        ("x" * (MAX_LABEL_TEXT + 1), "at most"),
        ("a\nb", "control characters"),
        ("a\x00", "control characters"),
    ],
)
def test_label_problem(value: object, problem: str) -> None:
    reason = label_problem(value)
    assert reason is not None and problem in reason


@pytest.mark.parametrize("value", [0, -(2**63), 2**63 - 1, "green", "ß", "x" * MAX_LABEL_TEXT])
def test_label_problem_accepts(value: object) -> None:
    assert label_problem(value) is None
