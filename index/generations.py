"""Durable generations of a store's files: write aside, fsync, commit by manifest, verify, fall back, prune.

Layout of a store root::

    gen-00000007/            data files of generation 7 (whatever the backend writes)
    manifest-00000007.json   the commit record of generation 7, written last
    .tmp-gen-00000008-*/     a save in progress (or one that crashed): never loaded, removed later
    .lock                    flock: exclusive while committing/pruning, shared while loading

Saving generation N: the backend writes its files into a fresh ``.tmp-gen-N-*`` directory beside the live
ones; every file and the directory are fsynced; the directory is renamed to ``gen-N`` (atomic) and the
root fsynced; then ``manifest-N.json`` is written to a temporary name, fsynced and atomically renamed into
place, and the root fsynced again (``model.durable.atomic_write_bytes``). The manifest's appearance under
its final name is the commit point: a crash before it leaves a directory without manifest (ignored and
pruned), a crash after it leaves a complete generation.

A manifest holds the model hash, embedding size, metric, backend and its options, the ordered task list,
the count per task, size and sha256 of every data file, the position of the last write-ahead-log record
the snapshot covers (``log_position``, 0 for stores without a log; see ``index.wal``), and a sha256 of its
own canonical body, so that a bit flip anywhere (manifest included) is detected. A gallery's snapshot
also holds copies of its metadata and config among the data files, under the same checksums.

Loading walks the committed generations newest first and serves the first one whose manifest and files
verify and whose model hash and embedding size match; every rejected generation is reported with the
reason (logged and kept in ``LoadOutcome.rejected``). When generations exist but none verifies,
``NoGoodGenerationError`` says why each failed.

After a commit, generations are pruned to two: the new one and the previous known-good one (the one this
process loaded or last committed, so that a corrupt newer generation never displaces the good one);
uncommitted directories and crashed temporaries go too. One writer process at a time is assumed per root
(the exclusive flock enforces it); readers in other processes take the shared flock while they load so a
prune never deletes a generation under them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from model.durable import FileLock, atomic_write_bytes, file_sha256, fsync_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEEP = 2
T = TypeVar("T")


class GenerationError(RuntimeError):
    """A generation that must not be served; the message names it and says why."""


class NoGoodGenerationError(GenerationError):
    """Committed generations exist but none verifies."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    generation: int
    model_hash: str
    embedding_dim: int
    metric: str
    backend: str
    tasks: list[str]
    counts: dict[str, int]
    files: dict[str, FileEntry]
    options: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    format_version: int = FORMAT_VERSION
    log_position: int = 0  # the last log record this generation covers (index.wal)

    def body(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        body = self.body()
        return json.dumps({**body, "manifest_sha256": _body_hash(body)}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        claimed = data.pop("manifest_sha256", None)
        if claimed != _body_hash(data):
            raise ValueError("manifest checksum mismatch (the manifest itself is corrupt)")
        data["files"] = {name: FileEntry(**entry) for name, entry in data["files"].items()}
        return cls(**data)


@dataclass
class LoadOutcome:
    manifest: Manifest | None = None
    rejected: list[str] = field(default_factory=list)


def _body_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _gen_name(generation: int) -> str:
    return f"gen-{generation:08d}"


def _manifest_name(generation: int) -> str:
    return f"manifest-{generation:08d}.json"


class Generations:
    """The generations under one store root; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.known_good: int | None = None  # the generation this process loaded or last committed
        self.rejected: list[str] = []  # why the last load refused newer generations

    def directory(self, manifest: Manifest) -> Path:
        return self.root / _gen_name(manifest.generation)

    def committed(self) -> list[int]:
        """Generation numbers that have a manifest, newest first."""
        if not self.root.exists():
            return []
        numbers = []
        for path in self.root.glob("manifest-*.json"):
            with contextlib.suppress(ValueError):
                numbers.append(int(path.stem.removeprefix("manifest-")))
        return sorted(numbers, reverse=True)

    @contextlib.contextmanager
    def locked(self, *, shared: bool) -> Iterator[None]:
        """The root's flock: exclusive while committing or pruning, shared while reading generations
        (and, for a gallery, its log: see ``index.gallery``)."""
        if shared and self.root.is_dir() and not os.access(self.root, os.W_OK):
            yield  # a read-only mount: no writer can commit or prune here, so there is nothing to wait for
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / ".lock", shared=shared):
            yield

    def manifests(self) -> dict[int, Manifest | str]:
        """Every committed generation's manifest, or why it cannot be read, newest first."""
        out: dict[int, Manifest | str] = {}
        for generation in self.committed():
            name = _manifest_name(generation)
            try:
                out[generation] = Manifest.from_json((self.root / name).read_text())
            except (OSError, ValueError, TypeError, KeyError) as e:
                out[generation] = f"{name}: unreadable or corrupt manifest ({e})"
        return out

    def retained_position(self) -> int:
        """The log position every kept generation covers: records up to it are in all of them."""
        positions = [m.log_position for m in self.manifests().values() if isinstance(m, Manifest)]
        return min(positions, default=0)

    def commit(
        self,
        write: Callable[[Path], None],
        *,
        model_hash: str,
        embedding_dim: int,
        backend: str,
        tasks: list[str],
        counts: dict[str, int],
        options: dict[str, Any] | None = None,
        metric: str = "ip",
        log_position: int = 0,
    ) -> Manifest:
        """Commit a new generation whose data files ``write(directory)`` creates."""
        with self.locked(shared=False):
            existing = [
                int(p.name.removeprefix("gen-")) for p in self.root.glob("gen-*") if p.name[4:].isdigit()
            ]
            generation = max([0, *self.committed(), *existing]) + 1
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{_gen_name(generation)}-", dir=self.root))
            try:
                write(tmp)
                files = {}
                for path in sorted(tmp.iterdir()):
                    fsync_path(path)
                    files[path.name] = FileEntry(size=path.stat().st_size, sha256=file_sha256(path))
                fsync_path(tmp)
                final = self.root / _gen_name(generation)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_path(self.root)
            manifest = Manifest(
                generation=generation,
                model_hash=model_hash,
                embedding_dim=embedding_dim,
                metric=metric,
                backend=backend,
                tasks=list(tasks),
                counts=dict(counts),
                files=files,
                options=dict(options or {}),
                created_at=dt.datetime.now(dt.UTC).isoformat(),
                log_position=log_position,
            )
            atomic_write_bytes(self.root / _manifest_name(generation), manifest.to_json().encode())
            previous, self.known_good = self.known_good, generation
            self._prune(keep_also=previous)
            return manifest

    def _prune(self, keep_also: int | None) -> None:
        committed = self.committed()
        keep = [committed[0]]
        if keep_also is not None and keep_also in committed and keep_also not in keep:
            keep.append(keep_also)
        keep += [g for g in committed if g not in keep][: max(0, KEEP - len(keep))]
        # Manifests go first: a crash mid-prune then leaves uncommitted directories, never a manifest
        # whose files are half deleted.
        for generation in committed:
            if generation not in keep:
                (self.root / _manifest_name(generation)).unlink()
        fsync_path(self.root)
        kept_dirs = {_gen_name(g) for g in keep}
        for path in self.root.iterdir():
            stale_gen = path.name.startswith("gen-") and path.name not in kept_dirs
            if stale_gen or path.name.startswith(".tmp-gen-"):
                shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(".manifest-*.tmp"):
            path.unlink(missing_ok=True)

    def verify(self, generation: int, *, model_hash: str | None, embedding_dim: int | None) -> Manifest:
        """The manifest of ``generation`` if it and its files check out; GenerationError otherwise."""
        name = _manifest_name(generation)
        try:
            manifest = Manifest.from_json((self.root / name).read_text())
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise GenerationError(f"{name}: unreadable or corrupt manifest ({e})") from e
        if manifest.format_version != FORMAT_VERSION:
            raise GenerationError(f"{name}: format version {manifest.format_version} is not supported")
        if model_hash is not None and manifest.model_hash != model_hash:
            raise GenerationError(
                f"{name}: built with model {manifest.model_hash[:12]}…, "
                f"but the model in use is {model_hash[:12]}… (rebuild the index for this model)"
            )
        if embedding_dim is not None and manifest.embedding_dim != embedding_dim:
            raise GenerationError(
                f"{name}: embedding size {manifest.embedding_dim}, expected {embedding_dim}"
            )
        directory = self.directory(manifest)
        for file_name, entry in manifest.files.items():
            path = directory / file_name
            if not path.is_file():
                raise GenerationError(f"{name}: data file {directory.name}/{file_name} is missing")
            if path.stat().st_size != entry.size:
                raise GenerationError(
                    f"{name}: {directory.name}/{file_name} has {path.stat().st_size} bytes, "
                    f"the manifest says {entry.size} (truncated or overwritten)"
                )
            if file_sha256(path) != entry.sha256:
                raise GenerationError(f"{name}: checksum mismatch in {directory.name}/{file_name} (corrupt)")
        return manifest

    def load_newest(
        self,
        read: Callable[[Manifest, Path], T],
        *,
        model_hash: str | None,
        embedding_dim: int | None,
    ) -> tuple[LoadOutcome, T | None]:
        """Verify and ``read(manifest, directory)`` the newest good generation, falling back to older ones.

        Returns an empty outcome when nothing was ever committed; raises NoGoodGenerationError when
        generations exist but none verifies (or ``read`` fails on every one that does)."""
        outcome = LoadOutcome()
        self.rejected = outcome.rejected
        with self.locked(shared=True):
            committed = self.committed()
            for generation in committed:
                try:
                    manifest = self.verify(generation, model_hash=model_hash, embedding_dim=embedding_dim)
                    value = read(manifest, self.directory(manifest))
                except GenerationError as e:
                    outcome.rejected.append(str(e))
                except Exception as e:  # a backend that cannot parse verified files: still not servable
                    outcome.rejected.append(f"{_manifest_name(generation)}: cannot be read ({e})")
                else:
                    for reason in outcome.rejected:
                        log.warning("refusing generation: %s; serving generation %d", reason, generation)
                    outcome.manifest = manifest
                    self.known_good = generation
                    return outcome, value
        if committed:
            raise NoGoodGenerationError(
                f"no servable generation under {self.root}: " + "; ".join(outcome.rejected)
            )
        return outcome, None
