"""The demo's caches under its data directory: the model (reused, copied from the shipped one, or
trained) and the index (reused or rebuilt), each written into a temporary directory that replaces the old
one only when complete. ``service.cli.demo`` drives them."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from index.build import build_gallery, dataset_source
from index.gallery import Gallery, GalleryError
from model.durable import FileLock, file_sha256
from model.run import CONFIG, METRICS, WEIGHTS, LoadedRun, RunError, load_run, read_config
from model.train import TrainConfig

# The demo model as shipped in the package, and the record of its weights' sha256.
SHIPPED_RUN = Path(__file__).parent / "demo_run"
SHIPPED_RECORD = "record.json"
INDEX_BATCH = 256  # images per embedding call while indexing


@dataclass(frozen=True)
class DemoPaths:
    data_dir: Path

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "runs" / "demo"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index" / "demo"

    @property
    def example(self) -> Path:
        return self.data_dir / "example.png"


# --- the model ---------------------------------------------------------------------------------------


def stale_run_reason(run_dir: Path, cfg: TrainConfig) -> str | None:
    """Why the run in ``run_dir`` cannot be reused for ``cfg`` (None: it can)."""
    try:
        config = read_config(run_dir)
    except RunError as e:
        return str(e)
    if not (run_dir / WEIGHTS).is_file():
        return f"{run_dir / WEIGHTS} is missing"
    if not (run_dir / METRICS).is_file():
        return f"{run_dir} is incomplete (no {METRICS}: training did not finish)"
    try:
        trained = TrainConfig.from_dict(config["train"])
    except (KeyError, TypeError) as e:
        return f"{run_dir} records no usable training settings ({e})"
    trained.device = cfg.device  # a model trained on a GPU serves as well on a CPU
    if trained != cfg:
        return f"{run_dir} was trained with other settings (steps {trained.steps}, width {trained.width})"
    return None


def shipped_sha256(shipped: Path = SHIPPED_RUN) -> str | None:
    """The sha256 the shipped model's record gives for its weights (None: no readable record)."""
    try:
        value = json.loads((shipped / SHIPPED_RECORD).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def shipped_run_reason(cfg: TrainConfig, shipped: Path = SHIPPED_RUN) -> str | None:
    """Why the shipped model cannot serve as the demo model for ``cfg`` (None: it can)."""
    reason = stale_run_reason(shipped, cfg)
    if reason is not None:
        return reason
    recorded = shipped_sha256(shipped)
    actual = file_sha256(shipped / WEIGHTS)
    if recorded != actual:
        return f"{shipped / WEIGHTS} has sha256 {actual}, its record says {recorded}"
    return None


def prepare_run(
    paths: DemoPaths, cfg: TrainConfig, *, retrain: bool = False, say: Callable[[str], None]
) -> LoadedRun:
    """The demo model, loaded: the cached run when valid, else the shipped one, else a freshly trained
    one (always with ``retrain``)."""
    from model.train import train

    reason = "--retrain" if retrain else stale_run_reason(paths.run_dir, cfg)
    if reason is None:
        try:
            run = load_run(paths.run_dir, device=cfg.device)
            say(f"model: reusing {paths.run_dir}")
            return run
        except RunError as e:
            reason = str(e)
    if not retrain and shipped_run_reason(cfg) is None:
        with _staging(paths.run_dir) as tmp:
            for name in (WEIGHTS, CONFIG, METRICS):
                shutil.copyfile(SHIPPED_RUN / name, tmp / name)
        say(
            f"model: the shipped demo model (sha256 {shipped_sha256()}, trained by `modret demo "
            f"--retrain`) → {paths.run_dir}"
        )
        return load_run(paths.run_dir, device=cfg.device)
    if paths.run_dir.exists():
        say(f"model: retraining ({reason})")
    say(
        f"model: training the default modulated network on {cfg.data.num_images} synthetic faces "
        f"({cfg.steps} steps, width {cfg.width}) into {paths.run_dir}"
    )
    with _staging(paths.run_dir) as tmp:
        metrics = train(cfg, tmp)
    mean = metrics["test"]["mean"]
    say(
        f"model: test triplet accuracy {mean['triplet_accuracy']:.3f}, mAP {mean['map']:.3f}, "
        f"leakage {mean.get('leakage') or 0:.3f}"
    )
    digest = file_sha256(paths.run_dir / WEIGHTS)
    shipped = shipped_sha256()
    if shipped_run_reason(cfg) is None or digest == shipped:
        same = "bit for bit the shipped model" if digest == shipped else f"not the shipped {shipped}"
        say(f"model: sha256 {digest}: {same}")
    return load_run(paths.run_dir, device=cfg.device)


# --- the index ---------------------------------------------------------------------------------------


def stale_index_reason(index_dir: Path, run: LoadedRun, backend: str) -> str | None:
    """Why the gallery in ``index_dir`` cannot be served with ``run`` (None: it can)."""
    try:
        gallery = Gallery.open(index_dir, read_only=True)
    except (GalleryError, OSError, ValueError, KeyError) as e:
        return str(e)
    try:
        if gallery.config.get("backend") != backend:
            return f"{index_dir} uses the {gallery.config.get('backend')} backend, not {backend}"
        if gallery.tasks != run.task_names:
            return f"{index_dir} holds tasks {gallery.tasks}, the model has {run.task_names}"
        report = gallery.verify(run.model_hash)
        if not report.ok:
            return "; ".join(report.problems[:3])
        if gallery.metadata.count() == 0:
            return f"{index_dir} is empty"
        first = gallery.metadata.get(gallery.metadata.ids()[:1])
        if not all(record.has_blob for record in first.values()):
            return f"{index_dir} keeps no image bytes (built by an older version): the web UI needs them"
    except Exception as e:  # a damaged store or database: rebuilding is the remedy
        return f"{index_dir} cannot be checked ({e})"
    finally:
        gallery.close()
    return None


def prepare_index(
    paths: DemoPaths,
    run: LoadedRun,
    num_images: int,
    *,
    backend: str = "faiss",
    milvus_uri: str | None = None,
    say: Callable[[str], None],
) -> None:
    """Make ``paths.index_dir`` a valid gallery of the demo's faces embedded with ``run``."""
    from model.progress import progress_bar

    reason = stale_index_reason(paths.index_dir, run, backend)
    if reason is None:
        say(f"index: reusing {paths.index_dir}")
        return
    if paths.index_dir.exists():
        say(f"index: rebuilding ({reason})")
    options: dict[str, Any] = {"kind": "flat"}
    if backend == "milvus":
        # One cluster may hold several galleries: a fresh collection prefix per build never collides.
        options = {"collection_prefix": f"modret_demo_{uuid.uuid4().hex[:12]}"}
        if milvus_uri:
            options["uri"] = milvus_uri
    source = dataset_source("synthfaces", image_size=run.preprocess.image_size, num_images=num_images)
    # Milvus records where its data lives (a Milvus Lite file inside the directory, or a cluster), so that
    # gallery is built in place; an interrupted build fails the check above next time and is rebuilt.
    staging = _staging(paths.index_dir) if backend == "faiss" else _in_place(paths.index_dir)
    # Channels-last convolutions embed the gallery ~25 % faster on a CPU (the same vectors to 2e-6).
    _memory_format(run.model, torch.channels_last)
    try:
        with staging as target, progress_bar(total=source.total, unit=" images", desc="index") as bar:
            report = build_gallery(
                run,
                source,
                target,
                backend=backend,
                store_options=options,
                batch_size=INDEX_BATCH,
                progress=bar.update,
            )
    finally:
        _memory_format(run.model, torch.contiguous_format)
    t = report.timings
    say(
        f"index: {report.added} faces × {len(report.tasks)} tasks → {paths.index_dir} in "
        f"{report.wall_s:.1f} s (embedding {t.embed_s:.1f} s, writing {t.write_s + t.save_s:.1f} s)"
    )


def _memory_format(model: torch.nn.Module, memory_format: torch.memory_format) -> None:
    model.to(memory_format=memory_format)  # type: ignore[call-overload]  # the stubs omit memory_format


@contextmanager
def _staging(final: Path) -> Iterator[Path]:
    """A fresh directory beside ``final`` that replaces ``final`` only when the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.new-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the run from a container (or user) that mounts it
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _in_place(final: Path) -> Iterator[Path]:
    """``final``, emptied first."""
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    yield final


@contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """One ``modret demo`` prepares a data directory at a time (a second one waits)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(data_dir / ".demo.lock"):  # blocking, exclusive
        yield
