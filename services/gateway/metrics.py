"""Prometheus metrics, one registry per app so tests can run several apps."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.request_seconds = Histogram(
            "dualtrack_http_request_duration_seconds",
            "HTTP request latency by route",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.search_seconds = Histogram(
            "dualtrack_search_duration_seconds",
            "Embed + vector search latency",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ingested_chunks = Counter(
            "dualtrack_ingested_chunks_total",
            "Chunks written by ingestion",
            ["classification"],
            registry=r,
        )
        self.ingested_documents = Counter(
            "dualtrack_ingest_documents_total",
            "Documents by ingest outcome",
            ["status"],
            registry=r,
        )
        self.answers = Counter(
            "dualtrack_answers_total",
            "Answers by route",
            ["route"],
            registry=r,
        )
