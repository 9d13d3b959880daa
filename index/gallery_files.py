"""Names of a gallery's files, how its config is read, and the errors that name a damaged file.

Apart from ``index.gallery`` so that ``index.checks`` (verify) can use them without importing the gallery.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from model.durable import storage_full

CONFIG = "gallery.json"
STORE_DIR = "store"
LOG_DIR = "log"
METADATA_COPY = "metadata.sqlite"  # inside a generation
_CONFIG_KEYS = ("backend", "store_options", "tasks", "embedding_dim", "model_hash")


class GalleryError(RuntimeError):
    """A gallery that cannot be opened or used as asked; the message says why."""


class StorageFull(GalleryError):
    """A write found no room on the gallery's disk (or quota): it was not applied, and the gallery takes
    the next write as usual, so freeing space is all that is needed."""

    def __init__(self, root: Path, exc: BaseException) -> None:
        super().__init__(
            f"no room to write under {root} ({exc}): the write was not applied; free disk space (or raise "
            "the quota) there and retry"
        )


def refused_write(root: Path, exc: BaseException, message: str) -> GalleryError:
    """The error for a write that failed with ``exc`` and was not applied: ``StorageFull`` when the disk
    had no room (freeing space is the remedy), else ``GalleryError(message)``."""
    return StorageFull(root, exc) if storage_full(exc) else GalleryError(message)


class DamagedGalleryError(GalleryError):
    """A file of the gallery is damaged; ``part`` is ``"config"``, ``"metadata"`` or ``"log"``."""

    def __init__(self, root: Path, part: str, what: str) -> None:
        hint = (
            f"run `modret index recover {root}` to rebuild it from the newest snapshot and the log"
            if part != "log"
            else "restore the gallery from a backup (docs/deploy.md)"
        )
        super().__init__(f"{root}: {what}; {hint}")
        self.part = part


def check_writable(root: Path) -> None:
    """``GalleryError`` unless this process may write in ``root``: a read-only mount is said as such, not
    met later as SQLite failing to open (which reads like a damaged database)."""
    if not os.access(root, os.W_OK):
        raise GalleryError(
            f"{root} is not writable (a read-only mount, or no write permission for this user): a gallery "
            "open for writing keeps its log, uploads and snapshots there; make it writable (`modret index "
            "info` and `verify` read it as it is)"
        )


def busy(root: Path) -> NoReturn:
    """A write to a logged gallery while it changes its task list (``Gallery.change_tasks``)."""
    raise GalleryError(f"{root} is changing its task list; retry in a moment")


def parse_config(root: Path, data: bytes) -> dict[str, Any]:
    """gallery.json's content, or a DamagedGalleryError saying what is wrong with it."""
    try:
        config = json.loads(data)
        if not isinstance(config, dict):
            raise ValueError(f"a JSON {type(config).__name__}, not an object")
        missing = [key for key in _CONFIG_KEYS if key not in config]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedGalleryError(root, "config", f"{CONFIG} is damaged ({e})") from None
    return config


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems
