"""Progress bars that suit where they are written: ``progress_bar(...)``.

On a terminal, a tqdm bar redrawn in place. Anywhere else (a CI log, ``modret compare > log 2>&1``, a
container's output) a redraw is a carriage return the file keeps, so a long run left thousands of them in
one line; there the bar is written as whole lines instead, one each time another ``LINE_EVERY_PERCENT``
percent is done (and one at the start and the end), each with tqdm's usual counts, rate and postfix.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm import tqdm

LINE_EVERY_PERCENT = 10


class LineBar(tqdm):
    """A tqdm bar that writes a full line per ``LINE_EVERY_PERCENT`` step of progress, never a redraw."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._shown: tuple[int, int] | None = None  # (percent step, n) of the last line written
        # Every update reaches display(), which decides; tqdm's own throttles would skip steps.
        super().__init__(*args, **{**kwargs, "mininterval": 0, "miniters": 1})

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm clearing its line (msg ""): there is no line to clear in a log
            return False
        step = int(100 * self.n / self.total) // LINE_EVERY_PERCENT if self.total else 0
        if self._shown is not None and self._shown[0] == step:
            return True
        self._write_line(step)
        return True

    def close(self) -> None:
        if not self.disable and (self._shown is None or self._shown[1] != self.n):
            self._write_line(-1)  # where it ended, if no line has said so yet
        self.leave = False  # tqdm's own close then only "clears" (display(msg="")): nothing to write
        super().close()

    def _write_line(self, step: int) -> None:
        self._shown = (step, self.n)
        self.fp.write(str(self).strip() + "\n")
        self.fp.flush()


def progress_bar(*, file: IO[str] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(**kwargs)`` on ``file`` (stderr by default): redrawn on a terminal, whole lines elsewhere."""
    stream = file if file is not None else sys.stderr
    interactive = getattr(stream, "isatty", lambda: False)()
    return (tqdm if interactive else LineBar)(file=stream, **kwargs)
