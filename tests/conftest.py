"""Fixtures every test package can use, built by ``tests.factories``: one tiny run and one gallery of
rendered faces per session, and a fresh copy of that gallery for each test that changes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import copy_gallery, make_gallery, make_run


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
