"""What every subcommand shares: telling a Ctrl-C from an error."""

from __future__ import annotations

import pytest

from service.cli.common import interrupted


class _CtrlC:
    """A descriptor whose ``__set_name__`` meets a Ctrl-C, as a lazy import's dataclass field can."""

    def __set_name__(self, owner: type, name: str) -> None:
        raise KeyboardInterrupt


def _caught(make: type[BaseException] | None = None) -> BaseException:
    try:
        if make is not None:
            raise make("boom")

        class Model:  # the class statement itself is what raises
            field = _CtrlC()

    except BaseException as exc:  # whatever the interpreter raised is what is inspected
        return exc
    raise AssertionError("nothing was raised")


def test_a_ctrl_c_in_a_class_body_counts_as_an_interrupt_whatever_wraps_it() -> None:
    exc = _caught()
    assert interrupted(exc), repr(exc)
    assert interrupted(KeyboardInterrupt())


@pytest.mark.parametrize("error", [RuntimeError, ValueError, SystemExit])
def test_an_error_without_a_ctrl_c_behind_it_is_not_an_interrupt(error: type[BaseException]) -> None:
    assert not interrupted(_caught(error))


def test_a_cycle_of_contexts_ends() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert not interrupted(a)
