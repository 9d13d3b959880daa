"""``modret index repair``: finish or roll back what crashed replicas left in a shared gallery (#14).

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

import typer
from rich.console import Console

from index.gallery_files import GalleryError
from index.replica_writes import REPAIR_AFTER_S
from service.cli.common import fail, problems_found

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
