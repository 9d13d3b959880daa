"""``modret demo``: the embedded default, from nothing to a served search in one command.

1. **model**: ``DATA_DIR/runs/demo`` is reused when it loads and was trained with the demo's settings;
   otherwise the model shipped in the package (``service/cli/demo_run``: the demo's settings, trained by
   ``modret demo --retrain``, its sha256 recorded in ``record.json``) is copied there; otherwise (other
   settings, or ``--retrain``) the default modulated network is trained on synthetic faces (``DEMO_STEPS``
   steps at width ``DEMO_WIDTH``, with a progress bar) into a temporary directory that replaces it only
   once complete, and the demo says whether it is bit for bit the shipped model.
2. **index**: ``DATA_DIR/index/demo`` is reused when it opens, was built with this model (the model hash
   recorded in the gallery matches the run's), uses the requested backend and verifies (checksums, every
   id in every task); otherwise the synthetic-faces gallery is embedded under every task with
   ``index.build`` (again into a temporary directory first).
3. **example**: ``DATA_DIR/example.png`` is a face from a family that is not in the gallery, checked to
   retrieve five faces that share the queried attribute (``service.cli.demo_example``); its labels are
   in ``DATA_DIR/example.json``.
4. **serve**: the API and web UI with ``service.api.server``'s server; once ready it prints the URL, the
   tasks and ready-to-paste ``curl`` searches with the example under two tasks (two answers for one
   image), and how long it took since the process started. The per-request access log is off unless
   ``--access-log``.

Everything is written under one data directory: ``--data-dir``, else ``MODRET_DATA_DIR``, else ``./data``.
A second run finds the model and the index valid and is serving within seconds. Every other service
setting (API keys, batching, limits) comes from ``MODRET_*`` variables as for ``modret serve``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, cast

import typer

from index.gallery import Gallery
from index.store import BACKENDS
from model.compare import SYNTHFACES_BUDGET
from model.run import LoadedRun
from model.train import DataConfig, TrainConfig
from service.cli.common import DeviceOpt, interrupted, load_settings
from service.cli.demo_cache import DemoPaths, data_dir_lock, prepare_index, prepare_run
from service.cli.demo_example import Example, find_example, write_example
from service.settings import Settings

_IMPORTED = time.perf_counter()
# The demo's training: `modret compare`'s synthetic-face recipe (routes at every stage, per-task neck,
# batch-all mining), so the demo serves the model docs/results.md measures, trained in about four minutes
# on two CPU cores (seconds on a GPU), plus the decorrelation term that keeps each task's results from
# sharing the query's other attributes (docs/results.md, "Leakage"). Changing these retrains the demo.
DEMO_STEPS = SYNTHFACES_BUDGET.steps
DEMO_WIDTH: int = cast(int, SYNTHFACES_BUDGET.width)  # trained from scratch: the budget names its width
DEMO_DECORRELATION = 4.0
DEMO_DECORRELATION_RAMP = 0.5
# Synthetic faces drawn for training and for the gallery (the same family, seed 0).
DEMO_IMAGES = 4000


def demo_train_config(steps: int, width: int, num_images: int, device: str = "auto") -> TrainConfig:
    """The demo's training configuration (the README's default model at the demo's budget)."""
    return TrainConfig(
        data=DataConfig("synthfaces", num_images=num_images),
        device=device,
        decorrelation=DEMO_DECORRELATION,
        decorrelation_ramp=DEMO_DECORRELATION_RAMP,
        **{**SYNTHFACES_BUDGET.train_options(), "steps": steps, "width": width},
    )


def process_age() -> float:
    """Seconds since this process started (its start time in /proc on Linux; elsewhere, since this module
    was imported), so that "ready in" counts interpreter start-up and imports too."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: ticks since boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED


# --- the example query and the banner ----------------------------------------------------------------


def prepare_example(
    paths: DemoPaths, run: LoadedRun, max_pixels: int, say: Callable[[str], None]
) -> Example | None:
    """The checked example (``service.cli.demo_example``) written as ``paths.example``, or None (and
    no stale example left behind) when no candidate face passes."""
    gallery = Gallery.open(paths.index_dir, read_only=True)
    try:
        example = find_example(run, gallery, max_pixels)
    finally:
        gallery.close()
    if example is None:
        paths.example.unlink(missing_ok=True)
        paths.example.with_suffix(".json").unlink(missing_ok=True)
        say("example: no candidate face retrieves 5 faces sharing its attribute; none printed")
        return None
    labels = write_example(example, paths.example)
    checked = ", ".join(f"{q.task}={q.value}" for q in example.queries)
    say(f"example: {paths.example} (labels in {labels.name}); top 5 checked under {checked}")
    return example


def public_url(host: str, port: int) -> str:
    """The URL to print for a bind address (a wildcard bind is reachable on loopback)."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else "[::1]" if host == "::" else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def banner(
    url: str,
    tasks: list[str],
    example: Path,
    queries: list[tuple[str, int]],
    gallery_size: int,
    api_key: bool,
    seconds: float,
) -> str:
    """The ready message; ``queries`` are the example's checked (task, value) searches."""
    shown = _shown_path(example)
    key = ' -H "X-API-Key: $MODRET_API_KEY"' if api_key else ""
    lines = [
        "",
        f"modret demo ready in {seconds:.1f} s: {url}  (web UI; API docs at {url}/docs)",
        f"gallery: {gallery_size} faces; tasks: {', '.join(tasks)}",
    ]
    if not queries:
        lines.append("no example search printed: no example face retrieved 5 faces sharing its attribute")
    for n, (task, value) in enumerate(queries):
        words = task.replace("_", " ").lower()
        lead = "search the gallery with the example face" if n == 0 else "the same face, another attribute"
        lines += [
            f"{lead}, by {words} (its top 5 all have {task} = {value}):",
            f"  curl -s{key} -F image=@{shown} '{url}/search?task={task.lower()}&k=5'",
        ]
    if queries:
        lines.append(f"the example's labels: {_shown_path(example.with_suffix('.json'))}")
    lines += ["Ctrl-C stops the server; the next `modret demo` reuses the model and the index.", ""]
    return "\n".join(lines)


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
    retrain: Annotated[
        bool,
        typer.Option(
            help="train again even if a valid or shipped model is there (and compare with the shipped)"
        ),
    ] = False,
    serve: Annotated[bool, typer.Option(help="serve once ready (--no-serve: only prepare the cache)")] = True,
    access_log: Annotated[
        bool, typer.Option(help="log one JSON line per request to stderr (off in the demo)")
    ] = False,
) -> None:
    """Reuse (or train) the default model on synthetic faces, index them, and serve the API and web UI."""
    started = time.perf_counter() - process_age()
    if backend not in BACKENDS:
        raise typer.BadParameter(
            f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}", param_hint="--backend"
        )
    settings = load_settings()
    paths = DemoPaths(data_dir if data_dir is not None else settings.data_dir)
    n = DEMO_IMAGES if num_images is None else num_images
    cfg = demo_train_config(
        DEMO_STEPS if steps is None else steps, DEMO_WIDTH if width is None else width, n, device
    )

    def say(message: str) -> None:
        typer.echo(message, err=True)

    try:
        with data_dir_lock(paths.data_dir):
            run = prepare_run(paths, cfg, retrain=retrain, say=say)
            prepare_index(paths, run, n, backend=backend, milvus_uri=milvus_uri, say=say)
            example = prepare_example(paths, run, settings.max_image_pixels, say)
    except BaseException as exc:
        # Ctrl-C while preparing is a user's stop, not a failure (``make demo`` must not report Error 130);
        # what was being built lives in a staging directory, so the next start rebuilds it.
        if not interrupted(exc):
            raise
        say("interrupted: nothing half-built was kept; run modret demo again to continue")
        raise typer.Exit(0) from None
    tasks = run.task_names
    del run
    queries = [(q.task, q.value) for q in example.queries] if example else []
    if not serve:
        say(f"prepared in {time.perf_counter() - started:.1f} s: {paths.run_dir}, {paths.index_dir}")
        return
    serve_demo(settings, paths, tasks, queries, host, port, device, started, access_log=access_log)


def serve_demo(
    base: Settings,
    paths: DemoPaths,
    tasks: list[str],
    queries: list[tuple[str, int]],
    host: str,
    port: int,
    device: str,
    started: float,
    *,
    access_log: bool = False,
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
    # One line per request would push the banner off the terminal (thousands in a sitting).
    logging.getLogger("service.access").disabled = not access_log

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
            paths.example,
            queries,
            size,
            settings.api_key is not None,
            time.perf_counter() - started,
        )
        typer.echo(text)

    threading.Thread(target=announce, name="demo-banner", daemon=True).start()
    server.run()
