from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.fixtures import Server, copy_gallery, make_gallery, make_run, running_server, settings_for


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "tiny")


@pytest.fixture(scope="session")
def gallery_template(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gallery(run_dir, tmp_path_factory.mktemp("gallery-template") / "index")


@pytest.fixture
def index_dir(gallery_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template gallery for tests that change it."""
    return copy_gallery(gallery_template, tmp_path / "index")


@pytest.fixture(scope="module")
def shared_server(
    run_dir: Path, gallery_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server per test module over its own gallery copy (read-mostly tests)."""
    index = copy_gallery(gallery_template, tmp_path_factory.mktemp("shared") / "index")
    settings = settings_for(run_dir, index, max_body_bytes=256 * 1024, max_image_pixels=1_000_000)
    with running_server(settings) as server:
        yield server
