"""Prometheus series of the answering path (registered into the gateway's registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class LLMMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "dualtrack_route_decisions_total",
            "Sensitivity-router decisions",
            ["target", "reason"],
            registry=registry,
        )
        self.served = Counter(
            "dualtrack_llm_answers_total",
            "Answers by the model that produced them",
            ["route"],
            registry=registry,
        )
        self.failovers = Counter(
            "dualtrack_llm_failovers_total",
            "Cloud requests answered locally instead",
            ["kind"],
            registry=registry,
        )
        self.breaker = Gauge(
            "dualtrack_llm_breaker_state",
            "Cloud circuit breaker: 0 closed, 1 half-open, 2 open",
            registry=registry,
        )
        self.tokens = Counter(
            "dualtrack_llm_completion_tokens_total",
            "Generated tokens (streamed chunks)",
            ["route"],
            registry=registry,
        )
        self.cancelled = Counter(
            "dualtrack_llm_streams_cancelled_total",
            "Streams closed because the client went away (upstream request closed too)",
            registry=registry,
        )
        self.first_token = Histogram(
            "dualtrack_llm_first_token_seconds",
            "Time to the first generated text",
            ["route"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
