"""Prometheus metrics of the sync consumer and publisher (one registry each, so
tests can run several in one process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class ConsumerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.events = Counter(
            "dualtrack_sync_events_total",
            "Change events by outcome: applied, stale (older than what is stored), duplicate, dead_letter",
            ["topic", "outcome"],
            registry=r,
        )
        self.lag = Gauge(
            "dualtrack_sync_lag",
            "Events in the partition not yet applied (high watermark - committed position)",
            ["topic", "partition"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "dualtrack_sync_batch_duration_seconds",
            "Time to apply one batch and commit its offsets",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.reembedded = Counter(
            "dualtrack_sync_reembedded_chunks_total",
            "Chunks embedded here because the sender's vectors were absent or from another model",
            registry=r,
        )
        self.store_retries = Counter(
            "dualtrack_sync_store_retries_total",
            "Batches retried because the knowledge base was unavailable or did not answer in time",
            registry=r,
        )

    def outcome(self, topic: str, outcome: str, n: int = 1) -> None:
        self.events.labels(topic, outcome).inc(n)


@dataclass
class PublisherMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.published = Counter(
            "dualtrack_sync_published_total",
            "Events the broker acknowledged",
            ["type"],
            registry=r,
        )
        self.withheld = Counter(
            "dualtrack_sync_withheld_total",
            "Local writes not published because their classification may not leave the site",
            ["classification"],
            registry=r,
        )
        self.pending = Gauge(
            "dualtrack_sync_outbox_pending",
            "Events written locally and not yet acknowledged by the broker",
            registry=r,
        )
        self.oversize = Counter(
            "dualtrack_sync_oversize_total",
            "Local writes not published: too large as an event even without vectors",
            registry=r,
        )
        self.rejected = Counter(
            "dualtrack_sync_rejected_total",
            "Events the broker refused for good (set aside in the outbox's rejected table)",
            registry=r,
        )
        self.send_errors = Counter(
            "dualtrack_sync_send_errors_total",
            "Failed deliveries (kept in the outbox and retried)",
            registry=r,
        )
