"""``Settings.metadata_url`` (``MODRET_METADATA_URL``): a PostgreSQL URL or unset, its password redacted."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_metadata_url_is_unset_by_default_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MODRET_METADATA_URL", raising=False)
    assert Settings(_env_file=None).metadata_url is None  # type: ignore[call-arg]
    monkeypatch.setenv("MODRET_METADATA_URL", "postgresql://modret@db:5432/modret?schema=gallery_a")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.metadata_url == "postgresql://modret@db:5432/modret?schema=gallery_a"
    assert settings.redacted()["metadata_url"] == settings.metadata_url  # no password: nothing to hide


def test_metadata_url_password_is_redacted_and_other_schemes_refused() -> None:
    settings = Settings(metadata_url="postgres://modret:s3cret@db:5432/modret", _env_file=None)  # type: ignore[call-arg]
    assert settings.redacted()["metadata_url"] == "postgres://modret:***@db:5432/modret"
    assert "s3cret" not in str(settings.redacted())
    with pytest.raises(ValidationError, match="postgresql://"):
        Settings(metadata_url="sqlite:///gallery.sqlite", _env_file=None)  # type: ignore[call-arg]
