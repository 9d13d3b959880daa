"""``modret serve``: serve a run's model over a gallery with uvicorn (see ``service.api.server``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from service.api.server import StartupFailed, build_server
from service.cli.common import fail, load_settings
from service.runtime.loaded import preflight


def serve(
    run: Annotated[Path, typer.Option(help="run directory written by `modret train`")],
    index: Annotated[Path, typer.Option(help="gallery directory written by `modret index build`")],
    host: Annotated[str, typer.Option(help="bind address (loopback by default)")] = "127.0.0.1",
    port: int = 8000,
    max_batch_size: Annotated[int | None, typer.Option(help="images per model call; 1: no batching")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="wait to fill a batch")] = None,
    create_index: Annotated[bool | None, typer.Option(help="create an empty gallery if none")] = None,
    device: Annotated[
        str | None, typer.Option(help="auto | cpu | cuda (default: MODRET_DEVICE or auto)")
    ] = None,
) -> None:
    """Serve RUN's model over the gallery in INDEX on HOST:PORT. Every other setting comes from
    ``MODRET_*`` environment variables or ``.env`` (see ``service.settings.Settings``)."""
    overrides: dict[str, Any] = {"run_dir": run, "index_dir": index, "host": host, "port": port}
    for name, value in (
        ("max_batch_size", max_batch_size),
        ("max_wait_ms", max_wait_ms),
        ("create_index", create_index),
        ("device", device),
    ):
        if value is not None:
            overrides[name] = value
    settings = load_settings(**overrides)
    problem = preflight(settings)  # a damaged gallery: one line, before the server starts
    if problem is not None:
        raise fail(problem)
    try:
        build_server(settings).run()
    except StartupFailed as exc:  # found while loading: another model's gallery, a damaged run, a lock…
        raise fail(str(exc)) from None
