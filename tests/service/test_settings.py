"""``Settings.metadata_url`` (``MODRET_METADATA_URL``): a PostgreSQL URL or unset, its password redacted;
the Milvus server settings (``MODRET_MILVUS_URI``, ``_COLLECTION_PREFIX``, ``_TOKEN``) and what they
override in a gallery's store options."""

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


def test_milvus_settings_override_store_options_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODRET_MILVUS_URI", "MODRET_MILVUS_COLLECTION_PREFIX", "MODRET_MILVUS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    unset = Settings(_env_file=None)  # type: ignore[call-arg]
    assert unset.store_overrides() == {} and unset.new_gallery_store() == {}
    monkeypatch.setenv("MODRET_MILVUS_URI", "http://milvus:19530")
    monkeypatch.setenv("MODRET_MILVUS_COLLECTION_PREFIX", "gallery_a")
    monkeypatch.setenv("MODRET_MILVUS_TOKEN", "root:Milvus")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.store_overrides() == {
        "milvus": {"uri": "http://milvus:19530", "collection_prefix": "gallery_a", "token": "root:Milvus"}
    }
    assert settings.new_gallery_store() == {  # what gallery.json records: never the token
        "backend": "milvus",
        "store_options": {"uri": "http://milvus:19530", "collection_prefix": "gallery_a"},
    }
    assert settings.redacted()["milvus_token"] == "***"


def test_milvus_uri_password_is_redacted_and_bad_values_refused() -> None:
    settings = Settings(milvus_uri="https://root:s3cret@milvus:443", _env_file=None)  # type: ignore[call-arg]
    assert settings.redacted()["milvus_uri"] == "https://root:***@milvus:443"
    assert settings.new_gallery_store()["store_options"]["collection_prefix"] == "modret"
    with pytest.raises(ValidationError, match="http://host:port"):
        Settings(milvus_uri="/data/gallery.db", _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match=r"milvus_collection_prefix"):
        Settings(milvus_collection_prefix="gallery-a", _env_file=None)  # type: ignore[call-arg]
