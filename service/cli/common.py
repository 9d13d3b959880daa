"""What every ``modret`` subcommand shares: the exit-code convention, error reporting, common options.

Exit codes, one convention for every subcommand:

- ``0`` — done;
- ``1`` (``EXIT_PROBLEMS``) — a check ran to the end and found problems (``modret index verify``), as
  ``diff`` and ``grep`` use 1 for a negative answer;
- ``2`` (``EXIT_ERROR``) — the command could not do what was asked: a wrong option or option value, a run,
  dataset or gallery that is missing or unreadable. click answers its own usage errors (a missing or
  malformed option) with 2 as well, so every error a user can make ends the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from service.settings import Settings

EXIT_PROBLEMS = 1
EXIT_ERROR = 2

console = Console(stderr=True)

DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when available, else CPU) | cpu | cuda")]


def fail(message: str) -> typer.Exit:
    """Report ``message`` on stderr; the ``typer.Exit`` to raise when the command cannot go on (exit 2)."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)  # a path or command stays whole
    return typer.Exit(code=EXIT_ERROR)


def load_settings(**overrides: Any) -> Settings:
    """``Settings(**overrides)`` (the rest from ``MODRET_*`` and ``.env``), or ``fail`` naming each value
    out of range and where it came from, e.g. ``port: Input should be less than or equal to 65535, got 99999
    (--port)``, instead of pydantic's traceback."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"])
            # Where the value came from: the command's own option, else the environment (or .env).
            source = f"--{name.replace('_', '-')}" if name in overrides else f"MODRET_{name.upper()}"
            problems.append(f"{name}: {error['msg']}, got {error.get('input')!r} ({source})")
        raise fail("invalid settings: " + "; ".join(problems)) from None


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a Ctrl-C, or an error a Ctrl-C caused: Python 3.11 wraps what a class body's
    ``__set_name__`` raises in a ``RuntimeError``, so a Ctrl-C that lands in a lazy import (torch's
    dataclasses, at a first optimiser step) arrives as one, with the ``KeyboardInterrupt`` as its cause."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def problems_found() -> typer.Exit:
    """The ``typer.Exit`` to raise when a check finished and reported problems (exit 1)."""
    return typer.Exit(code=EXIT_PROBLEMS)


def split(value: str | None) -> list[str] | None:
    """A comma-separated option as a list (None when empty)."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@contextmanager
def plain_warnings() -> Iterator[None]:
    """Warnings raised inside the block as one ``warning: ...`` line on stderr each, instead of Python's
    ``file:line: UserWarning:`` and the source line that raised it."""

    def show(message: Warning | str, *_: object, **__: object) -> None:
        console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True, highlight=False)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
