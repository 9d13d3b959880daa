"""Fixtures every test package can use, built by ``tests.factories``: one tiny run and one gallery of
rendered faces per session, and a fresh copy of that gallery for each test that changes it; one real
PostgreSQL server per session (``tests.postgres_server``) and a fresh database on it for each test; one
real Milvus server per session (``tests.milvus_server``: ``milvus_server``, ``milvus_prefix``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.factories import copy_gallery, make_gallery, make_run
from tests.milvus_server import milvus_prefix as milvus_prefix  # Milvus server fixtures, registered
from tests.milvus_server import milvus_server as milvus_server
from tests.postgres_server import PostgresServer, PostgresUnavailable


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of ``tiny_model`` over ``TASKS`` (perturbed modulation, so the tasks disagree), read-only."""
    return make_run(tmp_path_factory.mktemp("run") / "tiny")


@pytest.fixture(scope="session")
def gallery_template(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``GALLERY_SIZE`` faces embedded by ``run_dir``; never changed (copy it, or take ``index_dir``)."""
    return make_gallery(run_dir, tmp_path_factory.mktemp("gallery-template") / "index")


@pytest.fixture
def index_dir(gallery_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template gallery for tests that change it."""
    return copy_gallery(gallery_template, tmp_path / "index")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session, stopped at its end; skips (with the reason and how to fix
    it) the tests that need it where none can start."""
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as e:
        pytest.skip(f"no PostgreSQL server: {e}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database for this test alone, dropped after it."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)
