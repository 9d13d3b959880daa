"""``modret demo``: the embedded default, from nothing to a served search in one command.

1. **model**: ``DATA_DIR/runs/demo`` is reused when it loads and was trained with the demo's settings;
   otherwise the default modulated network is trained on synthetic faces (``DEMO_STEPS`` steps at width
   ``DEMO_WIDTH``, with a progress bar) into a temporary directory that replaces it only once complete.
2. **index**: ``DATA_DIR/index/demo`` is reused when it opens, was built with this model (the model hash
   recorded in the gallery matches the run's), uses the requested backend and verifies (checksums, every
   id in every task); otherwise the synthetic-faces gallery is embedded under every task with
   ``index.build`` (again into a temporary directory first).
3. **serve**: the API and web UI with ``service.api.server``'s server; once ready it prints the URL, the
   tasks and a ready-to-paste ``curl`` that searches with ``DATA_DIR/example.png`` (a face drawn from a
   family that is not in the gallery).

Everything is written under one data directory: ``--data-dir``, else ``MODRET_DATA_DIR``, else ``./data``.
A second run finds the model and the index valid and is serving within seconds. Every other service
setting (API keys, batching, limits) comes from ``MODRET_*`` variables as for ``modret serve``.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from index.build import build_gallery, dataset_source
from index.gallery import Gallery, GalleryError
from index.store import BACKENDS
from model.compare import SYNTHFACES_BUDGET
from model.durable import FileLock, atomic_write
from model.run import METRICS, WEIGHTS, LoadedRun, RunError, load_run, read_config
from model.train import DataConfig, TrainConfig
from service.cli.common import DeviceOpt
from service.settings import Settings

# The demo's training: `modret compare`'s synthetic-face recipe (routes at every stage, per-task neck,
# batch-all mining), so the demo serves the model docs/results.md measures, trained in about three and a
# half minutes on two CPU cores (seconds on a GPU). Changing these retrains the cached demo model.
DEMO_STEPS = SYNTHFACES_BUDGET.steps
DEMO_WIDTH = SYNTHFACES_BUDGET.width
# Synthetic faces drawn for training and for the gallery (the same family, seed 0).
DEMO_IMAGES = 4000
# The family the example query is drawn from: not the gallery's, so the example is a new face.
EXAMPLE_SEED = 1
EXAMPLE_SIZE = 128
CURL_TASK = "Smiling"


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


def demo_train_config(steps: int, width: int, num_images: int, device: str = "auto") -> TrainConfig:
    """The demo's training configuration (the README's default model at the demo's budget)."""
    return TrainConfig(
        data=DataConfig("synthfaces", num_images=num_images),
        device=device,
        **{**SYNTHFACES_BUDGET.train_options(), "steps": steps, "width": width},
    )


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


def prepare_run(
    paths: DemoPaths, cfg: TrainConfig, *, retrain: bool = False, say: Callable[[str], None]
) -> LoadedRun:
    """The demo model, loaded: the cached run when valid, else a freshly trained one."""
    from model.train import train

    reason = "--retrain" if retrain else stale_run_reason(paths.run_dir, cfg)
    if reason is None:
        try:
            run = load_run(paths.run_dir, device=cfg.device)
            say(f"model: reusing {paths.run_dir}")
            return run
        except RunError as e:
            reason = str(e)
    if paths.run_dir.exists():
        say(f"model: retraining ({reason})")
    say(
        f"model: training the default modulated network on {cfg.data.num_images} synthetic faces "
        f"({cfg.steps} steps, width {cfg.width}) into {paths.run_dir}"
    )
    with _staging(paths.run_dir) as tmp:
        metrics = train(cfg, tmp)
    mean = metrics["test"]["mean"]
    say(f"model: test triplet accuracy {mean['triplet_accuracy']:.3f}, mAP {mean['map']:.3f}")
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
    from tqdm import tqdm

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
    with staging as target, tqdm(total=source.total, unit="img", desc="index") as bar:
        report = build_gallery(
            run, source, target, backend=backend, store_options=options, progress=bar.update
        )
    say(
        f"index: {report.added} faces × {len(report.tasks)} tasks → {paths.index_dir} "
        f"in {report.wall_s:.1f} s"
    )


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
def _data_dir_lock(data_dir: Path) -> Iterator[None]:
    """One ``modret demo`` prepares a data directory at a time (a second one waits)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(data_dir / ".demo.lock"):  # blocking, exclusive
        yield


# --- the example query and the banner ----------------------------------------------------------------


def write_example(path: Path, task: str = CURL_TASK) -> Path:
    """A face that is not in the gallery and shows ``task`` (PNG), for the printed ``curl``."""
    from model.data.synthfaces import render_face

    if path.is_file():
        return path
    for index in range(100):
        image, labels = render_face(EXAMPLE_SEED, index, EXAMPLE_SIZE)
        if labels.get(task, 1) == 1:
            break
    atomic_write(path, lambda tmp: image.save(tmp, "PNG"))
    return path


def public_url(host: str, port: int) -> str:
    """The URL to print for a bind address (a wildcard bind is reachable on loopback)."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else "[::1]" if host == "::" else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def banner(
    url: str, tasks: list[str], example: Path, gallery_size: int, api_key: bool, seconds: float
) -> str:
    shown = _shown_path(example)
    key = ' -H "X-API-Key: $MODRET_API_KEY"' if api_key else ""
    task = CURL_TASK.lower() if CURL_TASK in tasks else tasks[0].lower()
    return "\n".join(
        [
            "",
            f"modret demo ready in {seconds:.1f} s: {url}  (web UI; API docs at {url}/docs)",
            f"gallery: {gallery_size} faces; tasks: {', '.join(tasks)}",
            "search the gallery with the example face, by smile:",
            f"  curl -s{key} -F image=@{shown} '{url}/search?task={task}&k=5'",
            "Ctrl-C stops the server; the next `modret demo` reuses the model and the index.",
            "",
        ]
    )


def _shown_path(path: Path) -> str:
    absolute = path.resolve()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


# --- the command --------------------------------------------------------------------------------------


def demo(
    data_dir: Annotated[
        Path | None, typer.Option(help="where the demo keeps everything (default: MODRET_DATA_DIR or ./data)")
    ] = None,
    host: Annotated[str, typer.Option(help="bind address (loopback by default)")] = "127.0.0.1",
    port: int = 8000,
    steps: Annotated[int | None, typer.Option(help=f"training steps (default {DEMO_STEPS})")] = None,
    width: Annotated[int | None, typer.Option(help=f"network base width (default {DEMO_WIDTH})")] = None,
    num_images: Annotated[
        int | None, typer.Option(help=f"synthetic faces to train on and index (default {DEMO_IMAGES})")
    ] = None,
    device: DeviceOpt = "auto",
    backend: Annotated[
        str, typer.Option(help=f"{' | '.join(BACKENDS)} (vector store of the demo gallery)")
    ] = "faiss",
    milvus_uri: Annotated[
        str | None, typer.Option(help="Milvus address, e.g. http://milvus:19530 (default: Milvus Lite file)")
    ] = None,
    retrain: Annotated[bool, typer.Option(help="train again even if a valid model is cached")] = False,
    serve: Annotated[bool, typer.Option(help="serve once ready (--no-serve: only prepare the cache)")] = True,
) -> None:
    """Train (or reuse) the default model on synthetic faces, index them, and serve the API and web UI."""
    started = time.perf_counter()
    if backend not in BACKENDS:
        raise typer.BadParameter(
            f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}", param_hint="--backend"
        )
    settings = Settings()
    paths = DemoPaths(data_dir if data_dir is not None else settings.data_dir)
    n = DEMO_IMAGES if num_images is None else num_images
    cfg = demo_train_config(
        DEMO_STEPS if steps is None else steps, DEMO_WIDTH if width is None else width, n, device
    )

    def say(message: str) -> None:
        typer.echo(message, err=True)

    with _data_dir_lock(paths.data_dir):
        run = prepare_run(paths, cfg, retrain=retrain, say=say)
        prepare_index(paths, run, n, backend=backend, milvus_uri=milvus_uri, say=say)
        example = write_example(paths.example)
    tasks = run.task_names
    del run
    if not serve:
        say(f"prepared in {time.perf_counter() - started:.1f} s: {paths.run_dir}, {paths.index_dir}")
        return
    serve_demo(settings, paths, tasks, example, host, port, device, started)


def serve_demo(
    base: Settings,
    paths: DemoPaths,
    tasks: list[str],
    example: Path,
    host: str,
    port: int,
    device: str,
    started: float,
) -> None:
    """Serve the demo's run and gallery with ``modret serve``'s server; print the banner once ready."""
    from service.api.server import build_server

    settings = base.model_copy(
        update={
            "data_dir": paths.data_dir,
            "run_dir": paths.run_dir,
            "index_dir": paths.index_dir,
            "host": host,
            "port": port,
            "device": device,
        }
    )
    server = build_server(settings)

    def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.05)
        loaded = server.state.loaded
        size = loaded.gallery.metadata.count() if loaded is not None else 0
        text = banner(
            public_url(settings.host, settings.port),
            tasks,
            example,
            size,
            settings.api_key is not None,
            time.perf_counter() - started,
        )
        typer.echo(text)

    threading.Thread(target=announce, name="demo-banner", daemon=True).start()
    server.run()
