"""``model.progress.progress_bar``: redrawn in place on a terminal, whole lines in a log."""

from __future__ import annotations

import io

from model.progress import LINE_EVERY_PERCENT, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(stream: io.StringIO, total: int = 800, stop: int | None = None) -> str:
    with progress_bar(total=total, desc="train modulated", unit="step", file=stream) as bar:
        for step in range(stop if stop is not None else total):
            bar.set_postfix({"loss": f"{1 / (step + 1):.4f}", "images/s": "123"})
            bar.update(1)
    return stream.getvalue()


def test_a_log_gets_one_line_per_step_of_progress_and_no_redraws() -> None:
    lines = run(io.StringIO()).splitlines()
    assert len(lines) == 100 // LINE_EVERY_PERCENT + 1  # 0 %, 10 %, ..., 100 %
    assert "\r" not in "".join(lines) and all(line.startswith("train modulated:") for line in lines)
    assert "100%" in lines[-1] and "800/800" in lines[-1] and "images/s=123" in lines[-1]


def test_a_log_of_an_unfinished_bar_ends_with_where_it_stopped() -> None:
    lines = run(io.StringIO(), stop=333).splitlines()
    assert lines[-1].startswith("train modulated:  42%") and "333/800" in lines[-1]
    assert len(lines) == 6  # 0 .. 40 %, then where it stopped


def test_a_terminal_gets_tqdm_redrawing_its_line() -> None:
    text = run(Terminal())
    assert text.count("\r") > 10 and text.count("\n") <= 1
