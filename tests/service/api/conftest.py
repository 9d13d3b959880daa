from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.factories import copy_gallery
from tests.service.api.server import Server, running_server, settings_for


@pytest.fixture(scope="module")
def shared_server(
    run_dir: Path, gallery_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server per test module over its own gallery copy (read-mostly tests)."""
    index = copy_gallery(gallery_template, tmp_path_factory.mktemp("shared") / "index")
    settings = settings_for(run_dir, index, max_body_bytes=256 * 1024, max_image_pixels=1_000_000)
    with running_server(settings) as server:
        yield server
