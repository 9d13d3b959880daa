"""A real, small file system for the tests of a full disk: a tmpfs mounted on a temporary folder.

Mounting needs root (CI runs as root); elsewhere the tests that need it skip, saying why. ``fill`` takes
all but a few bytes of the volume with one file, ``Volume.free`` deletes it again: the disk is full, then
it is not, with nothing of the code under test changed in between. ``Volume.read_only`` remounts it
read-only.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Volume:
    root: Path

    @property
    def filler(self) -> Path:
        return self.root / "filler"

    def available(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Take the volume's free space but ``leave`` bytes (whole blocks) with one file."""
        block = os.statvfs(self.root).f_frsize
        with self.filler.open("ab") as f:
            while (room := self.available() - leave) >= block:
                try:
                    f.write(b"\0" * (room // block * block))
                    f.flush()
                except OSError:  # full: the file system's own overhead took the rest
                    break

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def read_only(self) -> None:
        """Remount the volume read-only (as a replica's image volume, or a disk the kernel gave up on)."""
        subprocess.run(["mount", "-o", "remount,ro", str(self.root)], check=True, capture_output=True)


@contextmanager
def small_volume(where: Path, size: str = "4m") -> Iterator[Volume]:
    """A tmpfs of ``size`` mounted at ``where`` (created) for the duration; skips the test without root."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills) needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield Volume(where)
    finally:
        subprocess.run(["umount", "--lazy", str(where)], capture_output=True)
