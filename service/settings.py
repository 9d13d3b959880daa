"""Every setting of the service, read once from ``MODRET_*`` environment variables or a ``.env`` file.

This is the only place the service reads the environment. ``Settings.redacted()`` is what gets logged at
start: secrets (the API keys) appear as ``"***"`` when set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from PIL import Image
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODRET_", env_file=".env", extra="ignore")

    # What to serve
    run_dir: Path = Field(default=Path("runs/latest"), description="training run directory (model + config)")
    index_dir: Path = Field(
        default=Path("index"), description="gallery/index directory (`modret index build`)"
    )
    create_index: bool = Field(default=False, description="create an empty gallery when INDEX_DIR holds none")
    data_dir: Path = Field(
        default=Path("data"), description="where `modret demo` keeps its model, index and example image"
    )
    device: str = Field(
        default="auto",
        description="torch device for the model: auto (CUDA when available, else CPU), cpu, cuda",
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="intra-op threads of the model worker; 0: half the CPUs the process may use (at least "
        "1), leaving the rest to the event loop and image decoding",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # Dynamic batching
    max_batch_size: int = Field(
        default=32, ge=1, le=4096, description="images per model call; 1 turns batching off"
    )
    max_wait_ms: float = Field(default=5.0, ge=0, description="how long the worker waits to fill a batch")
    max_queue: int = Field(default=256, ge=1, description="queued embedding jobs before requests get 503")
    retry_after_s: int = Field(
        default=1, ge=1, description="Retry-After sent with 503 when the queue is full"
    )
    max_queue_delay_s: float = Field(
        default=1.0,
        gt=0,
        description="longest expected wait for the model (queued image-task rows and what is left of the "
        "batch in the model, over the measured throughput) "
        "before a search is shed with 503; at most half of request_timeout_s",
    )
    pace_early_retries: bool = Field(
        default=True,
        description="a connection refused as overloaded (503 with Retry-After) that is so refused again "
        "before the Retry-After it was given has passed gets that refusal once the time has passed (at most "
        "half of request_timeout_s): clients that resend at once are paced; served requests are never held",
    )
    max_queued_rows: int | None = Field(
        default=None, ge=1, description="fixed bound on queued image-task rows instead of the measured one"
    )

    # Input hardening
    max_body_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1024, description="request body cap, chunked too"
    )
    max_image_pixels: int = Field(
        le=Image.MAX_IMAGE_PIXELS or 89_478_485,
        default=24_000_000,
        ge=1,
        description="decoded pixel cap (Pillow's own bomb limit is 89M/179M)",
    )
    max_decode_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=16 * 1024 * 1024,
        description="decode memory shared by requests in flight; 503 when in use, 413 if one needs more",
    )
    max_form_parts: int = Field(
        default=64, ge=1, description="multipart files and fields accepted per request"
    )
    max_upload_files: int = Field(default=32, ge=1, description="images per POST /images")
    max_url_bytes: int = Field(
        default=8 * 1024, ge=256, le=1024 * 1024, description="request target (path + query) cap: 414 past it"
    )
    max_headers: int = Field(default=100, ge=8, le=10_000, description="request header lines cap: 431")
    max_header_bytes: int = Field(
        default=32 * 1024, ge=1024, le=1024 * 1024, description="request header bytes cap: 431 past it"
    )
    max_connections: int = Field(
        default=2048, ge=1, le=1_000_000, description="open client connections cap: 503 to the ones past it"
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="time from a request's first byte to its last header: 408"
    )
    request_timeout_s: float = Field(default=30.0, gt=0, description="per-request time limit (504 past it)")

    # Search
    candidate_factor: int = Field(default=4, ge=1, description="per-task candidates = factor x (offset + k)")

    # Access
    api_key: SecretStr | None = Field(
        default=None, description="required in X-API-Key on every non-health route"
    )
    admin_key: SecretStr | None = Field(default=None, description="required in X-API-Key for gallery writes")
    public_docs: bool = Field(
        default=False,
        description="serve /docs, /redoc and /openapi.json without the API key (when one is set)",
    )
    cors_origins: list[str] = Field(default_factory=list, description="CORS allowed origins; empty: off")

    # Lifecycle and logs
    warmup: bool = True
    drain_delay_s: float = Field(default=0.0, ge=0, description="time readiness reports 503 before shutdown")
    save_on_shutdown: bool = Field(
        default=True, description="snapshot the gallery on shutdown (its log keeps every write anyway)"
    )
    snapshot_every_records: int = Field(
        default=10_000, ge=1, description="snapshot the gallery in the background after this many writes"
    )
    snapshot_every_s: float = Field(
        default=300.0, gt=0, description="... or this many seconds after the first write since the last"
    )
    log_level: str = "INFO"

    # Replicas (#14)
    metadata_url: str | None = Field(
        default=None,
        description="PostgreSQL database for gallery metadata shared by replicas: "
        "postgresql://user[:password]@host:port/database[?schema=name] (index.postgres_metadata). When set "
        "the service serves the shared gallery of that database and MILVUS_URI (index.shared_gallery: no "
        "files in INDEX_DIR; CREATE_INDEX records the run's config in an empty database); unset: SQLite in "
        "INDEX_DIR",
    )

    milvus_uri: str | None = Field(
        default=None,
        description="Milvus server holding the vectors of a milvus gallery: http(s)://host:19530. When set "
        "it overrides the uri in the gallery's gallery.json (store_options), and CREATE_INDEX creates a "
        "milvus gallery on it; unset: gallery.json's uri (by default the gallery's Milvus Lite file)",
    )
    milvus_collection_prefix: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="names the gallery's collections on the Milvus server (one prefix per gallery); when "
        "set it overrides gallery.json's, which must then be the same (else the gallery refuses to open)",
    )
    milvus_token: SecretStr | None = Field(
        default=None, description="Milvus user:password or API key, when the server checks them"
    )

    @field_validator("metadata_url")
    @classmethod
    def _postgres_url(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme.lower() not in ("postgresql", "postgres"):
            raise ValueError("the metadata URL must be postgresql://user@host:port/database (or unset)")
        return url

    @field_validator("milvus_uri")
    @classmethod
    def _milvus_uri(cls, uri: str | None) -> str | None:
        if uri is not None and (
            urlsplit(uri).scheme.lower() not in ("http", "https") or not urlsplit(uri).hostname
        ):
            raise ValueError("the Milvus URI must be http://host:port or https://host:port (or unset)")
        return uri

    def store_overrides(self) -> dict[str, dict[str, Any]]:
        """What ``Gallery.open`` replaces in a gallery's store options, by backend: the Milvus settings
        that are set (an override wins over gallery.json; nothing set, nothing replaced)."""
        milvus: dict[str, Any] = {}
        if self.milvus_uri is not None:
            milvus["uri"] = self.milvus_uri
        if self.milvus_collection_prefix is not None:
            milvus["collection_prefix"] = self.milvus_collection_prefix
        if self.milvus_token is not None:
            milvus["token"] = self.milvus_token.get_secret_value()
        return {"milvus": milvus} if milvus else {}

    def new_gallery_store(self) -> dict[str, Any]:
        """``backend`` and ``store_options`` of a gallery the service creates (``create_index``): Milvus
        on ``milvus_uri`` when that is set (its uri and prefix recorded, never the token), else faiss."""
        if self.milvus_uri is None:
            return {}
        options = {"uri": self.milvus_uri, "collection_prefix": self.milvus_collection_prefix or "modret"}
        return {"backend": "milvus", "store_options": options}

    @property
    def model_threads(self) -> int:
        """``torch_threads``, with 0 resolved to half the CPUs this process may run on (at least 1)."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, len(os.sched_getaffinity(0)) // 2) if hasattr(os, "sched_getaffinity") else 1

    @property
    def queue_delay_budget_s(self) -> float:
        """The batcher's shedding delay: ``max_queue_delay_s``, never more than half the request timeout."""
        return min(self.max_queue_delay_s, self.request_timeout_s / 2)

    def redacted(self) -> dict[str, Any]:
        """All settings as JSON-able values, secrets replaced by ``"***"`` (or None when unset)."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                out[name] = "***"
            elif name in ("metadata_url", "milvus_uri") and value and urlsplit(value).password is not None:
                parts = urlsplit(value)  # the password in the URL is a secret too
                out[name] = urlunsplit(
                    parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}")
                )
            elif isinstance(value, Path):
                out[name] = str(value)
            else:
                out[name] = value
        return out
