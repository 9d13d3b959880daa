"""A writer-preferring reader-writer lock for the stores.

Searches take the read side and run concurrently (faiss and torch release the GIL while they compute);
``add``/``remove`` take the write side, so a search sees an add or remove either entirely or not at all,
never half of it. ``save`` takes the read side: it only reads the indexes, so searches continue during a
save while writers wait for a consistent snapshot to be written. Writers are preferred so that a steady
stream of searches cannot starve an upload.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
