"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGES = ("decode", "queue", "embed", "search", "respond")  # a search's stages, as in its timing_ms
STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_duration = Histogram(
            "modret_request_duration_seconds",
            "HTTP request duration by route template, task and status",
            ["route", "task", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "modret_queue_seconds",
            "time an embedding job waited in the batcher queue",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.embed_seconds = Histogram(
            "modret_embed_seconds",
            "model time per batch",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "modret_batch_size", "images per model call", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge("modret_queue_depth", "jobs waiting in the batcher", registry=self.registry)
        self.gallery_size = Gauge(
            "modret_gallery_size", "gallery items indexed per task", ["task"], registry=self.registry
        )
        self.stage_seconds = Histogram(
            "modret_search_stage_seconds",
            "time a search spent in each stage: decode (bytes to pixels), queue (waiting for the model), "
            "embed (its batch's model time), search (ranking and explanations), respond (metadata and the "
            "JSON body)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        for stage in STAGES:  # every stage's series exists from the start, at zero
            self.stage_seconds.labels(stage)
        self.rejects = Counter(
            "modret_rejects_total",
            "requests refused before any work, by reason",
            ["reason"],
            registry=self.registry,
        )

    def observe_batch(self, size: int, embed_s: float) -> None:
        self.batch_size.observe(size)
        self.embed_seconds.observe(embed_s)

    def observe_stages(self, timing_ms: dict[str, float]) -> None:
        """One search's stage times in ms (as in its ``timing_ms``); stages it skipped are left out."""
        for stage, value in timing_ms.items():
            if stage in STAGES and value > 0:
                self.stage_seconds.labels(stage).observe(value / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
