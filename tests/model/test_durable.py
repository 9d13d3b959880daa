"""model.durable on real files: atomic replacement and cleanup (a full disk included), fsync of file and
directory, streamed sha256, flock-based locks between real processes, and telling a full disk from other
write errors."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

import model.durable as durable
from model.durable import (
    FileLock,
    LockHeld,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    bytes_sha256,
    file_sha256,
    fsync_path,
    storage_full,
)
from tests.volumes import small_volume

REPO = Path(__file__).resolve().parents[2]

# A second process that takes a FileLock: argv = path, shared (0/1), blocking (0/1), marker directory.
# It writes ``started`` before trying and ``acquired`` once it holds the lock; exits 3 on LockHeld.
_CHILD = """
import sys
from pathlib import Path
from model.durable import FileLock, LockHeld
path, shared, blocking, markers = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1", Path(sys.argv[4])
(markers / "started").write_text("")
try:
    with FileLock(Path(path), shared=shared, blocking=blocking):
        (markers / "acquired").write_text("")
except LockHeld:
    sys.exit(3)
"""


def _child(lock: Path, markers: Path, *, shared: bool, blocking: bool) -> subprocess.Popen[bytes]:
    markers.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", _CHILD, str(lock), str(int(shared)), str(int(blocking)), str(markers)]
    return subprocess.Popen(args, env=env, cwd=REPO)


def _try_in_child(lock: Path, markers: Path, *, shared: bool) -> int:
    """Exit status of a second process's non-blocking attempt: 0 acquired, 3 refused (LockHeld)."""
    return _child(lock, markers, shared=shared, blocking=False).wait(timeout=60)


def _leftovers(directory: Path, keep: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


# --- atomic writes ------------------------------------------------------------------------------------


def test_atomic_write_replaces_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    target.write_text("old")
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        assert target.read_text() == "old", "the target must not change before the rename"
        tmp.write_text("new")

    atomic_write(target, write)
    assert target.read_text() == "new"
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".config.json.")
    assert seen[0].name.endswith(durable.TEMP_SUFFIX)
    assert _leftovers(tmp_path, "config.json") == []


def test_atomic_write_bytes_and_text(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "blob", b"\x00\x01payload")
    assert (tmp_path / "blob").read_bytes() == b"\x00\x01payload"
    atomic_write_bytes(tmp_path / "blob", b"second")
    assert (tmp_path / "blob").read_bytes() == b"second"
    atomic_write_text(tmp_path / "note.txt", "ünïcode ✓\n")
    assert (tmp_path / "note.txt").read_bytes() == "ünïcode ✓\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "note.txt"]


def test_written_files_are_readable_by_other_users(tmp_path: Path) -> None:
    # A run or gallery written by one user is served by another (the container runs as UID 10001).
    target = tmp_path / "model.safetensors"
    atomic_write_bytes(target, b"weights")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644

    def replace_it(tmp: Path) -> None:  # what safetensors' save_file does: a new file at that name
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"new weights")
        os.close(fd)

    atomic_write(target, replace_it)
    assert target.read_bytes() == b"new weights" and stat.S_IMODE(target.stat().st_mode) == 0o644


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a" / "b" / "file", b"x")
    atomic_write(tmp_path / "c" / "file", lambda tmp: tmp.write_bytes(b"y"))
    assert (tmp_path / "a" / "b" / "file").read_bytes() == b"x"
    assert (tmp_path / "c" / "file").read_bytes() == b"y"


def test_failing_write_callback_keeps_the_old_file_and_removes_the_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old weights")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, write)
    assert target.read_bytes() == b"old weights"
    assert _leftovers(tmp_path, target.name) == []


def test_failing_rename_keeps_the_old_file_and_removes_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")

    def refuse(src: object, dst: object) -> None:
        raise OSError("rename refused")

    monkeypatch.setattr(durable.os, "replace", refuse)
    with pytest.raises(OSError, match="rename refused"):
        atomic_write_bytes(target, b"new")
    with pytest.raises(OSError, match="rename refused"):
        atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, target.name) == []


@pytest.mark.parametrize("writer", ["callback", "bytes"])
def test_file_then_directory_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """The temp file is fsynced before the rename, the directory after it (unless sync_dir=False)."""
    target = tmp_path / "file"
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    monkeypatch.setattr(durable.os, "replace", replace)

    def write(sync_dir: bool) -> None:
        if writer == "callback":
            atomic_write(target, lambda tmp: tmp.write_bytes(b"data"), sync_dir=sync_dir)
        else:
            atomic_write_bytes(target, b"data", sync_dir=sync_dir)

    write(True)
    assert events == ["fsync file", "replace", "fsync dir"]
    events.clear()
    write(False)
    assert events == ["fsync file", "replace"]


def test_fsync_path_accepts_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    fsync_path(tmp_path / "f")
    fsync_path(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "missing")


# --- sha256 -------------------------------------------------------------------------------------------


def test_file_sha256_matches_hashlib_on_a_multi_chunk_file(tmp_path: Path) -> None:
    data = os.urandom(3 * durable._HASH_CHUNK + 12345)  # three full chunks and a partial one
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    exact = tmp_path / "exact.bin"  # a size that is a whole number of chunks
    exact.write_bytes(data[: 2 * durable._HASH_CHUNK])
    assert file_sha256(exact) == hashlib.sha256(data[: 2 * durable._HASH_CHUNK]).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_bytes_sha256_matches_hashlib() -> None:
    assert bytes_sha256(b"face") == hashlib.sha256(b"face").hexdigest()
    assert len(bytes_sha256(b"")) == 64


# --- locks --------------------------------------------------------------------------------------------


def test_exclusive_lock_excludes_a_second_process(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    with FileLock(lock):
        assert _try_in_child(lock, tmp_path / "a", shared=False) == 3
        assert _try_in_child(lock, tmp_path / "b", shared=True) == 3
        assert not (tmp_path / "a" / "acquired").exists() and not (tmp_path / "b" / "acquired").exists()
    assert _try_in_child(lock, tmp_path / "c", shared=False) == 0, "released: the child gets it"
    assert (tmp_path / "c" / "acquired").exists()


def test_blocking_acquire_waits_until_the_holder_releases(tmp_path: Path) -> None:
    lock, markers = tmp_path / ".lock", tmp_path / "m"
    holder = FileLock(lock).acquire()
    child = _child(lock, markers, shared=False, blocking=True)
    try:
        deadline = time.monotonic() + 60
        while not (markers / "started").exists():
            assert time.monotonic() < deadline and child.poll() is None, "the child did not start"
            time.sleep(0.02)
        time.sleep(0.5)
        assert child.poll() is None and not (markers / "acquired").exists(), "the lock did not hold it off"
        holder.release()
        assert child.wait(timeout=60) == 0
        assert (markers / "acquired").exists()
    finally:
        holder.release()
        if child.poll() is None:
            child.kill()
            child.wait()


def test_shared_locks_coexist_and_exclude_an_exclusive_one(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    with FileLock(lock, shared=True), FileLock(lock, shared=True, blocking=False):
        assert _try_in_child(lock, tmp_path / "a", shared=True) == 0
        assert _try_in_child(lock, tmp_path / "b", shared=False) == 3
        with pytest.raises(LockHeld):
            FileLock(lock, blocking=False).acquire()


def test_nonblocking_acquire_on_a_held_lock_raises_lock_held(tmp_path: Path) -> None:
    lock = tmp_path / "writer.lock"
    holder = FileLock(lock, blocking=False).acquire()
    assert holder.held
    contender = FileLock(lock, blocking=False)
    with pytest.raises(LockHeld, match="cannot take an exclusive lock") as caught:
        contender.acquire()
    assert isinstance(caught.value, BlockingIOError) and caught.value.filename == str(lock)
    assert not contender.held
    holder.release()
    holder.release()  # releasing twice is harmless
    assert not holder.held
    with contender:
        assert contender.held
    assert not contender.held


def test_lock_is_not_reentrant_and_creates_its_file(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "new.lock")
    with lock:
        assert (tmp_path / "new.lock").is_file()
        with pytest.raises(RuntimeError, match="not reentrant"):
            lock.acquire()
    assert not lock.held


def test_a_dropped_holder_frees_the_lock(tmp_path: Path) -> None:
    """Like an unreleased open(): once the holder is garbage, the file closes and the lock goes with it."""
    lock = tmp_path / ".lock"
    FileLock(lock).acquire()  # not kept
    with FileLock(lock, blocking=False):
        pass


def test_a_full_disk_is_told_apart_and_leaves_the_target_as_it_was(tmp_path: Path) -> None:
    with small_volume(tmp_path / "vol", "1m") as volume:
        target = volume.root / "blob"
        atomic_write_bytes(target, b"old")
        volume.fill(leave=4096)
        with pytest.raises(OSError) as raised:
            atomic_write_bytes(target, b"x" * (1 << 20))
        assert storage_full(raised.value) and raised.value.errno == errno.ENOSPC
        assert target.read_bytes() == b"old"
        assert not [p for p in volume.root.iterdir() if p.name.endswith(durable.TEMP_SUFFIX)]
        index = faiss.IndexFlatIP(64)  # a C++ library's write: its error carries only the errno's text
        index.add(np.zeros((4096, 64), dtype=np.float32))  # 1 MiB of vectors
        with pytest.raises(RuntimeError) as from_faiss:
            faiss.write_index(index, str(volume.root / "vectors.faiss"))
        assert storage_full(from_faiss.value)
        volume.free()
        atomic_write_bytes(target, b"x" * (1 << 19))  # room again: the same write succeeds
        assert target.stat().st_size == 1 << 19


def test_storage_full_knows_sqlite_full_and_chains_and_nothing_else(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "m.sqlite")
    db.execute("CREATE TABLE t (x BLOB)")
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(sqlite3.OperationalError) as full:
        db.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))
    assert storage_full(full.value)
    with pytest.raises(sqlite3.OperationalError) as missing:
        db.execute("SELECT * FROM nowhere")
    assert not storage_full(missing.value)
    try:
        raise RuntimeError("wrapped") from OSError(errno.EDQUOT, "quota")
    except RuntimeError as wrapped:
        assert storage_full(wrapped)
    assert storage_full(
        RuntimeError(f"write error in task-000.faiss: 4014 != 28160 ({os.strerror(errno.ENOSPC)})")
    )
    assert not storage_full(RuntimeError("write error in task-000.faiss: 4014 != 28160"))
    assert not storage_full(OSError(errno.EIO, "I/O error"))
    assert not storage_full(PermissionError(errno.EACCES, "denied"))
