"""What one running app holds: settings, the loaded run, the gallery, the batcher, readiness."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from index.gallery import Gallery
from model.run import METRICS, LoadedRun
from service.batcher import Batcher
from service.errors import ApiError
from service.gallery_writes import GalleryWriter
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger("service.state")


@dataclass
class Loaded:
    run: LoadedRun
    gallery: Gallery
    writer: GalleryWriter
    batcher: Batcher
    task_metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return self.run.task_names

    @property
    def model_name(self) -> str:
        return self.run.run_dir.resolve().name


@dataclass
class ServiceState:
    settings: Settings
    metrics: ServiceMetrics
    loaded: Loaded | None = None
    ready: bool = False  # startup (load + warm-up) finished
    draining: bool = False  # shutdown requested: readiness reports 503, requests are still served
    stopped: bool = False  # lifespan shutdown began: no new work

    def require(self) -> Loaded:
        """The loaded model and gallery, or 503 while starting or after shutdown began."""
        if self.loaded is None or not self.ready or self.stopped:
            reason = "shutting down" if self.stopped else "not ready (loading)"
            raise ApiError(503, "unavailable", f"service is {reason}", headers={"Retry-After": "1"})
        return self.loaded

    def require_ready(self) -> Loaded:
        """As ``require``, and 503 as soon as a shutdown was requested (for the readiness probe)."""
        loaded = self.require()
        if self.draining:
            raise ApiError(503, "unavailable", "service is shutting down", headers={"Retry-After": "1"})
        return loaded


def get_state(request: Request) -> ServiceState:
    state = request.app.state.modret
    assert isinstance(state, ServiceState)
    return state


def get_loaded(request: Request) -> Loaded:
    return get_state(request).require()


def read_task_metrics(run: LoadedRun) -> dict[str, dict[str, float]]:
    """Per-task test metrics (triplet accuracy, mAP, P@10) from the run's metrics.json, when present."""
    path = run.run_dir / METRICS
    try:
        data: Any = json.loads(path.read_text())
        tasks = data["test"]["tasks"]
        return {
            str(name): {str(k): float(v) for k, v in values.items() if isinstance(v, int | float)}
            for name, values in tasks.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
