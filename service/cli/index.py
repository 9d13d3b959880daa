"""``modret index``: build a gallery index from a trained run, describe it, verify it.

- ``build --run RUN_DIR (--images DIR | --dataset NAME [--data-dir DIR]) --out INDEX_DIR [--backend
  faiss|milvus [--milvus-uri URI] [--milvus-collection-prefix P]] [--kind flat|hnsw|ivfpq]
  [--no-store-images]`` embeds every image under every task in one pass (``index.build``) with a progress
  bar and writes one index per task plus the gallery metadata and, unless ``--no-store-images``, a copy of
  each image's bytes (so that the service can show them: ``GET /images/{id}/content``, the web UI's
  thumbnails; it never serves a file by its path).
- ``info INDEX_DIR``: tasks, counts, model hash, sizes, the served generation.
- ``verify INDEX_DIR [--run RUN_DIR]``: checksums of every kept generation and of its metadata and config
  copies, the write-ahead log, model match, every id present in every task; exits 1 on any problem (exit
  codes: ``service.cli.common``), a damaged file included (one line saying what and what to do).
- ``compact INDEX_DIR``: snapshot now and truncate the log behind it (the service does this in the
  background; run it with the service stopped, e.g. before a backup).
- ``recover INDEX_DIR``: for a gallery that refuses to open, restore gallery.json and rebuild
  gallery.sqlite from the newest snapshot's copies and the log, keeping the damaged files beside them.
- ``add-task --run NEWRUN --index INDEX_DIR --task NAME [--images DIR]``: embed the gallery's images under
  one task of a child run (``modret task add``) only and add its index durably (``Gallery.add_task``);
  images the gallery did not store are read from ``--images`` (matched by content hash).
- ``remove-task --index INDEX_DIR --task NAME``: drop one task's index (the gallery counterpart of
  ``modret task remove``).
- ``load --run RUN (--images DIR | --dataset NAME) [--metadata-url URL] [--milvus-uri URI]``: embed and
  add images to the replicas' shared gallery (``service.cli.index_shared``).
- ``repair [--metadata-url URL] [--milvus-uri URI] [--older-than S] [--verify-only]``: the shared
  gallery of replicas (PostgreSQL + a Milvus server): finish or roll back what crashed replicas left,
  then verify both engines (``service.cli.index_shared``).

``add-task`` and ``remove-task`` open the gallery for writing: stop the service that serves it first, then
start it again (or ``POST /admin/reload`` a service started after the change) to serve the new task list. A
running service indexes a new task of its run itself: ``POST /admin/tasks/{task}/index``.

``info`` and ``verify`` open the gallery read-only, so they can run beside a service that serves it.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from index import recovery
from index.build import build_gallery, dataset_source, folder_source
from index.gallery import Gallery, GalleryError
from index.store import BACKENDS
from model.progress import progress_bar
from model.run import load_run
from service.cli.common import DeviceOpt, fail, problems_found
from service.cli.index_shared import load, repair

index_app = typer.Typer(
    help="Build, inspect, verify, compact and recover gallery indexes.", no_args_is_help=True
)
index_app.command("repair")(repair)
index_app.command("load")(load)
console = Console()


@index_app.command()
def build(
    run: Path = typer.Option(..., "--run", help="Trained run directory (model.safetensors + config.json)."),
    out: Path = typer.Option(..., "--out", help="New directory for the gallery index."),
    images: Path | None = typer.Option(None, "--images", help="Folder of gallery images (recursive)."),
    labels: Path | None = typer.Option(
        None, "--labels", help="CSV of the images' labels (filename, a column each); default DIR/labels.csv."
    ),
    dataset: str | None = typer.Option(None, "--dataset", help="Dataset name, e.g. synthfaces or celeba."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="The dataset's files."),
    num_images: int | None = typer.Option(None, "--num-images", help="Dataset size or subsample."),
    backend: str = typer.Option("faiss", "--backend", help=f"Vector store: {' or '.join(BACKENDS)}."),
    kind: str = typer.Option("flat", "--kind", help="faiss index kind: flat (exact), hnsw or ivfpq."),
    milvus_uri: str | None = typer.Option(
        None,
        "--milvus-uri",
        help="Milvus server for --backend milvus, e.g. http://host:19530 (default: a Milvus Lite file).",
    ),
    milvus_prefix: str | None = typer.Option(
        None,
        "--milvus-collection-prefix",
        help="Names this gallery's collections on the Milvus server (default: modret_<random id>).",
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    store_images: bool = typer.Option(
        True,
        "--store-images/--no-store-images",
        help="Keep each image's bytes in the gallery so the service can show them (off for huge galleries).",
    ),
    device: DeviceOpt = "auto",
) -> None:
    """Embed a gallery under every task and write one index per task plus metadata."""
    if (images is None) == (dataset is None):
        raise fail("give exactly one of --images DIR or --dataset NAME")
    try:
        loaded = load_run(run, device=device)
    except ValueError as e:
        raise fail(str(e)) from e
    image_size = loaded.preprocess.image_size
    if labels is not None and images is None:
        raise fail("--labels goes with --images DIR (a dataset brings its own labels)")
    if images is not None:
        try:
            source = folder_source(images, labels)
        except ValueError as e:  # a malformed labels CSV: the message names the file and line
            raise fail(str(e)) from e
        if source.labels_from is not None:
            console.print(f"labels for {source.labelled} of {source.total} images from {source.labels_from}")
    else:
        assert dataset is not None
        source = dataset_source(dataset, data_dir, image_size=image_size, num_images=num_images)
    options: dict[str, Any] = {"kind": kind} if backend == "faiss" else {}
    options |= _milvus_options(backend, milvus_uri, milvus_prefix)
    try:
        with progress_bar(total=source.total, unit=" images", desc="embedding") as bar:
            report = build_gallery(
                loaded,
                source,
                out,
                backend=backend,
                store_options=options,
                batch_size=batch_size,
                store_images=store_images,
                progress=bar.update,
            )
    except (FileExistsError, GalleryError, ValueError) as e:
        raise fail(str(e)) from e
    t = report.timings
    console.print(
        f"{report.added} images ({report.duplicates} duplicates, {len(report.skipped)} unreadable) × "
        f"{len(report.tasks)} tasks → {out} in {report.wall_s:.1f} s "
        f"(read {t.read_s:.1f} s, embed {t.embed_s:.1f} s, write {t.write_s:.1f} s, save {t.save_s:.1f} s; "
        f"{report.image_tasks_per_s:.0f} image-tasks/s)"
    )
    for reason in report.skipped[:10]:
        console.print(f"[yellow]skipped[/yellow] {reason}")


def _milvus_options(backend: str, uri: str | None, prefix: str | None) -> dict[str, Any]:
    """The store options of ``--milvus-uri`` / ``--milvus-collection-prefix``. On a server every build
    gets a prefix of its own unless one is given, so galleries sharing the server never share collections."""
    if uri is None and prefix is None:
        return {}
    if backend != "milvus":
        raise fail("--milvus-uri and --milvus-collection-prefix go with --backend milvus")
    options: dict[str, Any] = {} if uri is None else {"uri": uri}
    options["collection_prefix"] = prefix or f"modret_{uuid.uuid4().hex[:12]}"
    console.print(f"Milvus collections: {options['collection_prefix']}_<position>_<task>")
    return options


def _open(index_dir: Path) -> Gallery:
    try:
        return Gallery.open(index_dir, read_only=True)
    except GalleryError as e:
        raise fail(str(e)) from e


@index_app.command()
def info(index_dir: Path = typer.Argument(..., help="Gallery index directory.")) -> None:
    """Tasks, counts, model hash and sizes of a gallery index."""
    gallery = _open(index_dir)
    try:
        summary = gallery.info()
    finally:
        gallery.close()
    table = Table(title=str(summary.root), show_header=False)
    table.add_row("backend", f"{summary.backend} {summary.options}")
    table.add_row("model hash", summary.model_hash)
    table.add_row("embedding size", str(summary.embedding_dim))
    table.add_row("generation", str(summary.generation))
    table.add_row("items", str(summary.items))
    table.add_row("log", f"{summary.log_records} records after the snapshot")
    for task, count in summary.counts.items():
        table.add_row(f"task {task}", f"{count} vectors")
    for part, size in summary.sizes.items():
        table.add_row(f"size {part}", f"{size / 1e6:.2f} MB")
    for reason in summary.rejected_generations:
        table.add_row("[red]refused[/red]", reason)
    console.print(table)


@index_app.command()
def verify(
    index_dir: Path = typer.Argument(..., help="Gallery index directory."),
    run: Path | None = typer.Option(
        None, "--run", help="Also check the index was built with this run's model."
    ),
) -> None:
    """Checksums, model match, every id present in every task; exit status 1 on any problem."""
    model_hash = fingerprints = None
    if run is not None:
        try:
            loaded = load_run(run)
        except ValueError as e:
            raise fail(str(e)) from e
        model_hash, fingerprints = loaded.model_hash, loaded.fingerprints
    if not index_dir.is_dir():
        raise fail(f"{index_dir} does not exist")
    try:
        gallery = Gallery.open(index_dir, read_only=True)
    except GalleryError as e:  # an index that cannot be opened is what verify reports, not a usage error
        console.print(f"[red]problem[/red] {e}", soft_wrap=True)
        raise problems_found() from e
    try:
        report = gallery.verify(model_hash, fingerprints)
    finally:
        gallery.close()
    for line in report.checked:
        console.print(f"[green]ok[/green] {line}", soft_wrap=True)
    for problem in report.problems:
        console.print(f"[red]problem[/red] {problem}", soft_wrap=True)
    if not report.ok:
        raise problems_found()


@index_app.command()
def compact(index_dir: Path = typer.Argument(..., help="Gallery index directory.")) -> None:
    """Snapshot the gallery now and truncate its write-ahead log behind the snapshot."""
    try:
        gallery = Gallery.open(index_dir)
    except GalleryError as e:
        raise fail(str(e)) from e
    try:
        before = gallery.info()
        manifest = gallery.save()
        after = gallery.info()
    except GalleryError as e:
        raise fail(str(e)) from e
    finally:
        gallery.close(snapshot=False)
    generation = manifest.generation if manifest is not None else None
    console.print(
        f"generation {generation}: {after.items} items; log {before.sizes['log'] / 1e6:.2f} MB "
        f"({before.log_records} records after the snapshot) → {after.sizes['log'] / 1e6:.2f} MB",
        soft_wrap=True,
    )


@index_app.command()
def recover(index_dir: Path = typer.Argument(..., help="Gallery index directory.")) -> None:
    """Rebuild a damaged gallery.json / gallery.sqlite from the newest snapshot and the log."""
    try:
        done = recovery.recover(index_dir)
    except GalleryError as e:
        raise fail(str(e)) from e
    for line in done or ["nothing to recover: the gallery opens as it is"]:
        console.print(f"[green]ok[/green] {line}", soft_wrap=True)


def _open_for_writing(index_dir: Path, **run: Any) -> Gallery:
    if not (index_dir / "gallery.json").is_file():
        raise fail(f"{index_dir} holds no gallery (gallery.json not found)")
    try:
        return Gallery.open(index_dir, **run)
    except GalleryError as e:
        hint = "; stop the service that serves it first" if "another process" in str(e) else ""
        raise fail(f"{e}{hint}") from e


@index_app.command("add-task")
def add_task(
    run: Path = typer.Option(..., "--run", help="The run with the new task (from `modret task add`)."),
    index_dir: Path = typer.Option(..., "--index", help="Gallery index directory."),
    task: str = typer.Option(..., "--task", help="The run's task to index."),
    images: Path | None = typer.Option(
        None, "--images", help="The gallery's original images, for a gallery built with --no-store-images."
    ),
    device: DeviceOpt = "auto",
) -> None:
    """Embed the gallery's images under one new task of the run only and add its index."""
    from index.tasks import ImagesNotStoredError

    try:
        loaded = load_run(run, device=device)
    except ValueError as e:
        raise fail(str(e)) from e
    by_hash = None
    if images is not None:
        if not images.is_dir():
            raise fail(f"--images {images} is not a directory")
        by_hash = {item.content_hash: images / item.source for item in folder_source(images).items}
    gallery = _open_for_writing(index_dir, model_hash=loaded.model_hash, fingerprints=loaded.fingerprints)
    try:
        name = next((t for t in loaded.task_names if t.casefold() == task.casefold()), task)
        with progress_bar(total=gallery.metadata.count(), unit=" images", desc=f"embedding {name}") as bar:
            added = gallery.add_task(name, loaded, images=by_hash, progress=bar.update)
        tasks = gallery.tasks
    except (GalleryError, ImagesNotStoredError, ValueError) as e:
        raise fail(str(e).strip("'\"")) from e
    finally:
        gallery.close(snapshot=False)
    console.print(
        f"{name}: {added} images embedded and indexed in {index_dir} (tasks now {', '.join(tasks)}); "
        "restart the service, or POST /admin/reload, to serve it",
        soft_wrap=True,
    )


@index_app.command("remove-task")
def remove_task(
    index_dir: Path = typer.Option(..., "--index", help="Gallery index directory."),
    task: str = typer.Option(..., "--task", help="The task whose index to drop."),
) -> None:
    """Drop one task's index from the gallery (the gallery counterpart of `modret task remove`)."""
    gallery = _open_for_writing(index_dir)
    try:
        name = next((t for t in gallery.tasks if t.casefold() == task.casefold()), task)
        gallery.remove_task(name)
        tasks = gallery.tasks
    except GalleryError as e:
        raise fail(str(e)) from e
    finally:
        gallery.close(snapshot=False)
    console.print(f"{name}: index removed from {index_dir} (tasks now {', '.join(tasks)})", soft_wrap=True)
