"""``modret index repair`` and ``load``: the shared gallery of replicas, offline (#14).

``load --run RUN (--images DIR [--labels CSV] | --dataset NAME ...)`` embeds images under the gallery's
tasks and adds them to the shared gallery through the replicas' write protocol (what ``index build`` does
for a gallery directory), beside running replicas if need be; an empty database gets the run's config first
(as ``MODRET_CREATE_INDEX`` does), and content already there keeps its id.

``repair``: finish or roll back what crashed replicas left in a shared gallery.

The gallery is the one the replicas serve (``index.shared_gallery``): PostgreSQL metadata
(``--metadata-url`` / ``MODRET_METADATA_URL``) and a Milvus server (``--milvus-uri`` /
``MODRET_MILVUS_URI``; ``MODRET_MILVUS_COLLECTION_PREFIX`` and ``MODRET_MILVUS_TOKEN`` as the service
reads them). The pass (``index.replica_writes.repair``): pending items older than ``--older-than``
seconds are committed when every task's collection holds their vectors, else rolled back; vectors
without a metadata row are removed. Then it verifies both engines (every committed id in every
collection, with the labels PostgreSQL holds; no vector without a row) and exits 1 when they disagree,
0 when they agree, 2 when the gallery cannot be opened (``service.cli.common``).

``--verify-only`` changes nothing: it reports (beside live replicas a write in flight can show as a
transient problem; run it again). Every replica runs the same pass on start (for items older than 5
minutes) and on pending rows in the background. ``--older-than 0`` also rolls back adds that are in
flight now: use it only while no replica is writing (those adds would fail, never half done, but fail).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from index.build import dataset_source, fill_gallery, folder_source
from index.gallery_files import GalleryError
from index.replica_writes import REPAIR_AFTER_S
from model.progress import progress_bar
from model.run import load_run
from service.cli.common import DeviceOpt, fail, problems_found

console = Console()


def repair(
    metadata_url: str = typer.Option(
        ..., "--metadata-url", envvar="MODRET_METADATA_URL", help="The replicas' PostgreSQL metadata URL."
    ),
    milvus_uri: str = typer.Option(
        ..., "--milvus-uri", envvar="MODRET_MILVUS_URI", help="The Milvus server holding the vectors."
    ),
    collection_prefix: str | None = typer.Option(
        None,
        "--milvus-collection-prefix",
        envvar="MODRET_MILVUS_COLLECTION_PREFIX",
        help="Must be the recorded one.",
    ),
    token: str | None = typer.Option(None, "--milvus-token", envvar="MODRET_MILVUS_TOKEN", hidden=True),
    older_than: float = typer.Option(
        REPAIR_AFTER_S, "--older-than", min=0.0, help="Seconds after which a pending add counts as crashed."
    ),
    verify_only: bool = typer.Option(
        False, "--verify-only", help="Change nothing: only verify both engines."
    ),
) -> None:
    """Finish or roll back the adds and removes that crashed replicas left; verify both engines."""
    from index.shared_gallery import SharedGallery  # psycopg and pymilvus: only here

    try:
        gallery = SharedGallery.open(
            metadata_url,
            milvus_uri=milvus_uri,
            milvus_token=token,
            collection_prefix=collection_prefix,
            read_only=verify_only,
            repair=False,
            repair_every_s=None,
            repair_after_s=older_than,
        )
    except GalleryError as e:
        raise fail(str(e)) from e
    try:
        done = None if verify_only else gallery.repair(older_than_s=older_than)
        report = gallery.verify()
    except GalleryError as e:
        raise fail(str(e)) from e
    finally:
        gallery.close()
    if done is not None:
        for line in done.describe() or ["nothing to repair"]:
            console.print(f"[green]repaired[/green] {line}", soft_wrap=True)
    for line in report.checked:
        console.print(f"[green]ok[/green] {line}", soft_wrap=True)
    for problem in report.problems:
        console.print(f"[red]problem[/red] {problem}", soft_wrap=True)
    if not report.ok:
        raise problems_found()


def load(
    run: Path = typer.Option(..., "--run", help="The run the replicas serve (its model embeds the images)."),
    images: Path | None = typer.Option(None, "--images", help="Folder of images (recursive)."),
    labels: Path | None = typer.Option(
        None, "--labels", help="CSV of the images' labels; default DIR/labels.csv."
    ),
    dataset: str | None = typer.Option(None, "--dataset", help="Dataset name, e.g. synthfaces or celeba."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="The dataset's files."),
    num_images: int | None = typer.Option(None, "--num-images", help="Dataset size or subsample."),
    metadata_url: str = typer.Option(
        ..., "--metadata-url", envvar="MODRET_METADATA_URL", help="The replicas' PostgreSQL metadata URL."
    ),
    milvus_uri: str = typer.Option(
        ..., "--milvus-uri", envvar="MODRET_MILVUS_URI", help="The Milvus server holding the vectors."
    ),
    collection_prefix: str | None = typer.Option(
        None,
        "--milvus-collection-prefix",
        envvar="MODRET_MILVUS_COLLECTION_PREFIX",
        help="Must be the recorded one.",
    ),
    token: str | None = typer.Option(None, "--milvus-token", envvar="MODRET_MILVUS_TOKEN", hidden=True),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    store_images: bool = typer.Option(
        True,
        "--store-images/--no-store-images",
        help="Keep each image's bytes (in PostgreSQL) to serve them.",
    ),
    device: DeviceOpt = "auto",
) -> None:
    """Embed images and add them to the replicas' shared gallery (PostgreSQL + Milvus)."""
    from index.shared_gallery import SharedGallery

    if (images is None) == (dataset is None):
        raise fail("give exactly one of --images DIR or --dataset NAME")
    if labels is not None and images is None:
        raise fail("--labels goes with --images DIR (a dataset brings its own labels)")
    try:
        loaded = load_run(run, device=device)
        if images is not None:
            source = folder_source(images, labels)
        else:
            assert dataset is not None
            source = dataset_source(
                dataset, data_dir, image_size=loaded.preprocess.image_size, num_images=num_images
            )
    except ValueError as e:
        raise fail(str(e)) from e
    try:
        gallery = SharedGallery.open(
            metadata_url,
            milvus_uri=milvus_uri,
            milvus_token=token,
            collection_prefix=collection_prefix,
            create=True,
            tasks=loaded.task_names,
            dim=loaded.embedding_dim,
            model_hash=loaded.model_hash,
            fingerprints=loaded.fingerprints,
            repair=False,
            repair_every_s=None,
        )
    except GalleryError as e:
        raise fail(str(e)) from e
    try:
        with progress_bar(total=source.total, unit=" images", desc="embedding") as bar:
            report = fill_gallery(
                loaded, source, gallery, batch_size=batch_size, store_images=store_images, progress=bar.update
            )
        where = gallery.where
    except (GalleryError, ValueError) as e:
        raise fail(str(e)) from e
    finally:
        gallery.close()
    console.print(
        f"{report.added} images added ({report.duplicates} already there, {len(report.skipped)} unreadable) "
        f"× {len(report.tasks)} tasks → {where} in {report.wall_s:.1f} s",
        soft_wrap=True,
    )
