"""Making a gallery that refuses to open openable again, without losing an acknowledged write.

``Gallery.open`` refuses a gallery whose ``gallery.json`` or ``gallery.sqlite`` is damaged (one line naming
the file), and never "repairs" by deleting vectors. ``recover`` restores the damaged part from the newest
snapshot's verified copy (or, for the metadata of a gallery whose log reaches back to its creation, from an
empty database), replays the log on the next open, and keeps the damaged file as ``*.damaged-<time>``.
``modret index recover`` runs it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from index.gallery import Gallery
from index.gallery_files import CONFIG, LOG_DIR, METADATA_COPY, STORE_DIR, DamagedGalleryError, GalleryError
from index.generations import GenerationError, Generations
from index.metadata import DB_NAME, Metadata
from model.durable import FileLock, LockHeld

log = logging.getLogger(__name__)


def recover(root: Path) -> list[str]:
    """Restore gallery.json and rebuild gallery.sqlite from the newest snapshot's copies and the log (the
    damaged files are kept as ``*.damaged-<time>``) until the gallery opens. Returns what it did."""
    done: list[str] = []
    rebuilt: set[str] = set()
    while True:
        try:
            gallery = Gallery.open(root)
        except DamagedGalleryError as e:
            if e.part == "log" or e.part in rebuilt:  # nothing here to rebuild it from
                raise
            rebuilt.add(e.part)
            done.append(_rebuild(root, e.part, str(e)))
            continue
        done += gallery.repairs
        gallery.close()
        return done


def _aside(path: Path) -> Path:
    """Move a damaged file out of the way, keeping it (``<name>.damaged-<UTC time>``)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    os.replace(path, target)
    return target


@contextlib.contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    try:
        lock = FileLock(root / "writer.lock", blocking=False).acquire()
    except LockHeld:
        raise GalleryError(f"{root} is open for writing in another process; stop it first") from None
    try:
        yield
    finally:
        lock.release()


def _newest_copy(root: Path, name: str) -> tuple[int, Path] | None:
    """The newest generation whose files verify and that holds a copy of ``name``."""
    generations = Generations(root / STORE_DIR)
    for generation in generations.committed():
        try:
            manifest = generations.verify(generation, model_hash=None, embedding_dim=None)
        except GenerationError:
            continue
        if name in manifest.files:
            return generation, generations.directory(manifest) / name
    return None


def _rebuild(root: Path, part: str, why: str) -> str:
    """Replace the damaged ``part`` ("config" or "metadata") from the newest snapshot; say what was done."""
    with _writer_lock(root):
        name = CONFIG if part == "config" else DB_NAME
        found = _newest_copy(root, CONFIG if part == "config" else METADATA_COPY)
        kept = []
        for path in [root / name, *(root.glob(f"{name}-*") if part == "metadata" else [])]:
            if path.exists():
                kept.append(_aside(path).name)
        if found is not None:
            generation, copy = found
            shutil.copyfile(copy, root / name)
            source = f"its copy in generation {generation}"
        elif part == "metadata" and (root / LOG_DIR / f"{1:020d}.wal").exists():
            Metadata(root, create=True, logged=True).close()  # the log holds every write since creation
            source = "an empty database (the log holds every write)"
        else:
            raise GalleryError(f"{root}: {why}; no snapshot holds a copy to rebuild it from")
        line = f"{name} rebuilt from {source} (damaged file kept as {', '.join(kept) or 'nothing'})"
        log.warning("%s: %s", root, line)
        return line
