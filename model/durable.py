"""Durable files: atomic replacement, fsync, sha256 and advisory file locks, in one place.

Every file the project keeps (run weights and configs, training checkpoints, store manifests, gallery
configs, image blobs, dataset caches) is written the same way:

1. a temporary file is created beside the target, in the same directory (so the final rename never
   crosses a file system), named ``.<name>.<random>.tmp`` by :func:`tempfile.mkstemp` (unique per
   writer, mode 0600);
2. the content is written to it and the file is fsynced;
3. it is renamed over the target with :func:`os.replace` (atomic: a reader sees the old file or the new
   one, never half of either);
4. the directory is fsynced, which makes the rename itself durable.

If anything fails before the rename, the temporary file is removed and the old target is left
untouched. A crash (power loss, ``kill -9``) can still leave a ``.<name>.*.tmp`` file behind; callers that
care remove those when they next own the directory (``index.generations`` prunes ``.manifest-*.tmp``).

:class:`FileLock` is an advisory ``fcntl.flock`` lock on a lock file: exclusive (one holder) or shared
(many holders, no exclusive one). ``flock`` locks belong to an open file description, so two
:class:`FileLock` objects on the same path exclude each other even inside one process (between threads
too); the lock goes away with the holder's process, so a crash never leaves a stale lock.

This module is in ``model/``, the lowest layer, so that ``index/`` and ``service/`` can use it too; it
depends on the standard library only.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

__all__ = [
    "TEMP_SUFFIX",
    "FileLock",
    "LockHeld",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "bytes_sha256",
    "file_sha256",
    "fsync_path",
    "storage_full",
]

TEMP_SUFFIX = ".tmp"  # temporary files are ``.<name>.<random>.tmp`` beside their target
_HASH_CHUNK = 1 << 20  # file_sha256 reads this many bytes at a time


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames and creations inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FILE_MODE = 0o644

# errno values that mean "no room to write": the volume is full, the user's quota is spent, or the file
# would pass the size limit (RLIMIT_FSIZE); freeing space (or raising the limit) is the remedy for each.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_SQLITE_FULL = 13  # SQLITE_FULL: "database or disk is full"


def storage_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says the disk or quota had no room for a write: an
    ``OSError`` with ENOSPC/EDQUOT/EFBIG, SQLite's SQLITE_FULL, or a plain ``RuntimeError`` quoting one
    of those errnos' text. Such a write can be retried once space is freed; other I/O errors cannot be
    assumed to leave the file as it was."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_ROOM:
            return True
        if getattr(current, "sqlite_errorcode", None) == _SQLITE_FULL:  # sqlite3.Error (Python 3.11+)
            return True
        if type(current) is RuntimeError and any(os.strerror(e) in str(current) for e in _NO_ROOM):
            return True  # a C++ library's error that carries only the errno's text (faiss' write_index)
        current = current.__cause__ or current.__context__
    return False


def _temp_beside(path: Path) -> tuple[int, Path]:
    """A new, empty temporary file in ``path``'s directory (created, with its parents, if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    # mkstemp creates 0600; the finished file gets what a plain open() would give under the usual umask,
    # so a run or gallery written by one user can be served by another (the container's UID 10001).
    os.fchmod(fd, FILE_MODE)
    return fd, Path(name)


def atomic_write(path: Path, write: Callable[[Path], object], *, sync_dir: bool = True) -> None:
    """Atomically replace ``path`` with what ``write(tmp_path)`` writes to a temporary path beside it.

    For writers that want a file name (``safetensors.torch.save_file``, ``torch.save``, ``Image.save``):
    ``write`` is given the path of an existing, empty temporary file and may open, truncate and write it
    (note that ``np.save`` given a *name* appends ``.npy``: open the path and pass the file object).
    The temporary file is then fsynced and renamed over ``path``, and ``path``'s directory fsynced unless
    ``sync_dir`` is false (for callers that write many files into one directory and fsync it once
    afterwards with :func:`fsync_path`). Missing parent directories are created. If ``write`` (or
    anything before the rename) raises, the temporary file is removed, ``path`` is left as it was, and
    the exception propagates.
    """
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # a writer may have replaced the temp file (safetensors does): 0600 again
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_path(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Atomically replace ``path`` with ``data``; durability and cleanup as :func:`atomic_write`."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), sync_dir=sync_dir)


def atomic_write_text(path: Path, text: str, *, encoding: str = "utf-8", sync_dir: bool = True) -> None:
    """Atomically replace ``path`` with ``text`` encoded as ``encoding``; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode(encoding), sync_dir=sync_dir)


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks (constant memory for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    """The hex sha256 of ``data`` (the content address of gallery images)."""
    return hashlib.sha256(data).hexdigest()


class LockHeld(BlockingIOError):
    """A non-blocking :class:`FileLock` could not be acquired: another holder has a conflicting lock."""


class FileLock:
    """An advisory ``fcntl.flock`` lock on the file ``path`` (created if missing; its directory must exist).

    ``shared=False`` takes the exclusive lock, ``shared=True`` a shared one (shared holders coexist; an
    exclusive one excludes all others). ``blocking=True`` waits for the lock; ``blocking=False`` raises
    :class:`LockHeld` (a :class:`BlockingIOError`) at once when a conflicting lock is held.

    Use it as a context manager (``with FileLock(root / ".lock", shared=True): ...``), or call
    :meth:`acquire` and later :meth:`release` for a lock held across calls (``acquire`` returns the lock).
    A lock object is not reentrant: acquiring it while it is held is an error.
    """

    def __init__(self, path: Path, *, shared: bool = False, blocking: bool = True) -> None:
        self.path = Path(path)
        self.shared = shared
        self.blocking = blocking
        # A file object rather than a bare descriptor: if a holder is dropped without release(), the
        # garbage collector closes the file and so frees the lock, as an unreleased ``open()`` would.
        self._file: BinaryIO | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> FileLock:
        """Take the lock (waiting for it unless non-blocking); raises :class:`LockHeld` if it is taken."""
        if self._file is not None:
            raise RuntimeError(f"{self.path}: this FileLock is already held (it is not reentrant)")
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        if not self.blocking:
            mode |= fcntl.LOCK_NB
        file = self.path.open("a+b")
        try:
            fcntl.flock(file, mode)
        except BlockingIOError:
            file.close()
            kind = "a shared" if self.shared else "an exclusive"
            raise LockHeld(
                errno.EWOULDBLOCK,
                f"cannot take {kind} lock: held by another process or FileLock",
                str(self.path),
            ) from None
        except BaseException:
            file.close()
            raise
        self._file = file
        return self

    def release(self) -> None:
        """Release the lock; does nothing if it is not held."""
        file, self._file = self._file, None
        if file is None:
            return
        try:
            fcntl.flock(file, fcntl.LOCK_UN)
        finally:
            file.close()

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        kind = "shared" if self.shared else "exclusive"
        return f"FileLock({str(self.path)!r}, {kind}, {'held' if self.held else 'not held'})"
