"""The consumer against a real Kafka-protocol broker: hostile streams end in the right
state, bad messages land on the dead-letter topic with their reason, and the consumer
keeps going; Debezium envelopes become documents."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from confluent_kafka.admin import AdminClient, ConfigResource

from services.config import Settings
from services.kb.embedder import Embedder
from services.sync import events
from services.sync.consumer import REASON_HEADER, SyncConsumer, rewind
from services.sync.kafka import ensure_topics, topic_configs
from tests.services.sync.conftest import (
    counter,
    delete,
    produce,
    read_topic,
    running_consumer,
    send_events,
    unit_vectors,
    upsert,
)


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def handled(consumer: SyncConsumer) -> float:
    return sum(counter(consumer, o) for o in ("applied", "stale", "duplicate", "dead_letter"))


def reason(message: Any) -> str:
    return dict(message.headers() or [])[REASON_HEADER].decode()


def test_hostile_stream_ends_in_the_right_state(
    sync_settings: Callable[..., Settings], embedder: Embedder
) -> None:
    settings = sync_settings()
    dim = embedder.dimension
    good_vectors = unit_vectors(2, dim, seed=7)
    stream: list[tuple[bytes | None, bytes | None]] = []

    def add(e: Any) -> None:
        stream.append((events.key(e), events.encode(e)))

    v1 = upsert("travel", 10, ["Economy class for flights under six hours."])
    v2 = upsert("travel", 20, ["Business class above six hours.", "Book through the portal."])
    add(v1), add(v2), add(v1), add(v2)  # duplicated and out of order
    memo = upsert("memo", 10, ["Quarterly numbers."])
    add(memo), add(delete("memo", 11)), add(memo)  # a delete racing a redelivered upsert
    add(upsert("vectors", 5, ["a.", "b."], vectors=good_vectors, model=embedder.model_id))
    stream.append((b"junk", b"{not json"))
    v3 = json.loads(events.encode(upsert("future", 1, ["x."])))
    v3["schema_version"] = 2
    stream.append((b"future", json.dumps(v3).encode()))
    wrong = json.loads(
        events.encode(upsert("wrongdim", 1, ["y."], vectors=unit_vectors(1, dim, 8), model="m"))
    )
    wrong["embedding"]["dimension"] = dim + 1  # vectors disagree with the declared dimension
    stream.append((b"wrongdim", json.dumps(wrong).encode()))
    stream.append((b"empty", None))
    add(upsert("secret", 1, ["Falcon terms."], classification="confidential"))
    add(upsert("after-the-bad-ones", 1, ["The consumer kept going."]))
    ensure_topics(settings.sync, topic_configs(settings.sync))  # as the consumer does on start
    produce(settings, stream)

    with running_consumer(settings, embedder) as (consumer, kb):
        wait_for(lambda: handled(consumer) >= len(stream), what="every message handled")
        assert kb.store.get_document("travel").version == v2.version
        assert kb.store.count_chunks("travel") == 2
        assert kb.store.get_document("memo") is None and kb.store.count_chunks("memo") == 0
        assert kb.store.count_chunks("vectors") == 2
        assert kb.store.get_document("after-the-bad-ones") is not None
        for doc in ("future", "wrongdim", "secret"):
            assert kb.store.get_document(doc) is None
        assert counter(consumer, "dead_letter") == 5
        assert (
            counter(consumer, "applied") + counter(consumer, "stale") + counter(consumer, "duplicate")
            == len(stream) - 5
        )

    dlq = read_topic(settings.sync.bootstrap_servers, settings.sync.dlq_topic, expect=5)
    by_key = {m.key(): m for m in dlq}
    admin = AdminClient({"bootstrap.servers": settings.sync.bootstrap_servers})
    (described,) = admin.describe_configs([ConfigResource("topic", settings.sync.topic)]).values()
    config = {name: entry.value for name, entry in described.result().items()}
    assert config["cleanup.policy"] == "delete" and config["retention.ms"] == "-1"  # never compacted
    assert set(by_key) == {b"junk", b"future", b"wrongdim", b"empty", b"secret"}
    assert "not JSON" in reason(by_key[b"junk"]) and by_key[b"junk"].value() == b"{not json"
    assert "schema_version 2 is not supported" in reason(by_key[b"future"])
    assert f"{dim}-d vector but embedding.dimension is {dim + 1}" in reason(by_key[b"wrongdim"])
    assert "empty message" in reason(by_key[b"empty"])
    assert "confidential" in reason(by_key[b"secret"])
    assert by_key[b"secret"].value() is None, "a refused confidential event is never copied"
    headers = dict(by_key[b"junk"].headers())
    assert headers["dualtrack.dlq.topic"] == settings.sync.topic.encode()


def test_restart_resumes_after_the_last_committed_batch(
    sync_settings: Callable[..., Settings], embedder: Embedder
) -> None:
    settings = sync_settings()
    send_events(settings, [upsert(f"doc-{i}", 1, [f"text {i}."]) for i in range(30)])
    with running_consumer(settings, embedder) as (consumer, _):
        wait_for(lambda: counter(consumer, "applied") >= 30, what="30 applied")
    send_events(settings, [upsert(f"doc-{i}", 2, [f"text {i} revised."]) for i in range(5)])
    with running_consumer(settings, embedder) as (consumer, kb):
        wait_for(lambda: handled(consumer) >= 5, what="5 more")
        time.sleep(1.0)
        # only the new events: the first 30 were committed before the first consumer stopped
        assert handled(consumer) == 5 and counter(consumer, "applied") == 5
        assert kb.store.count_chunks() == 30
    # rewound (as after a restore): everything is read again, and nothing changes
    assert set(rewind(settings)) == {settings.sync.topic}
    with running_consumer(settings, embedder) as (consumer, kb):
        wait_for(lambda: handled(consumer) >= 35, what="35 re-read")
        assert counter(consumer, "duplicate") == 30 and counter(consumer, "stale") == 5
        assert kb.store.count_chunks() == 30


def test_metrics_show_outcomes_and_lag(sync_settings: Callable[..., Settings], embedder: Embedder) -> None:
    from tests.support import free_port

    port = free_port()
    settings = sync_settings(metrics_port=port)
    send_events(settings, [upsert("m1", 1, ["a."]), upsert("m1", 1, ["a."]), upsert("m1", 0, ["old."])])
    from services.sync.runner import _metrics_server

    with running_consumer(settings, embedder) as (consumer, _), _metrics_server(settings, consumer.metrics):
        wait_for(lambda: handled(consumer) >= 3, what="3 handled")
        consumer_lag_seen = False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not consumer_lag_seen:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            consumer_lag_seen = "dualtrack_sync_lag{" in text
            time.sleep(0.5)
    assert f'dualtrack_sync_events_total{{outcome="applied",topic="{settings.sync.topic}"}} 1.0' in text
    assert f'dualtrack_sync_events_total{{outcome="duplicate",topic="{settings.sync.topic}"}} 1.0' in text
    assert f'dualtrack_sync_events_total{{outcome="stale",topic="{settings.sync.topic}"}} 1.0' in text
    assert consumer_lag_seen
    lags = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("dualtrack_sync_lag{")
    ]
    assert lags and all(v == 0 for v in lags), lags


def test_lag_shows_what_is_still_to_apply(sync_settings: Callable[..., Settings], embedder: Embedder) -> None:
    """The lag gauge comes from the client's own position and the last fetch's high watermark:
    behind, it is the number of events not yet applied; caught up, zero."""
    settings = sync_settings(batch_size=2)
    send_events(settings, [upsert(f"lag{i}", 1, [f"note {i}."]) for i in range(10)])
    highest = 0.0

    def lag(consumer: SyncConsumer) -> float:
        return sum(
            s.value
            for m in consumer.metrics.lag.collect()
            for s in m.samples
            if s.name == "dualtrack_sync_lag"
        )

    with running_consumer(settings, embedder) as (consumer, _):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and handled(consumer) < 10:
            highest = max(highest, lag(consumer))
            time.sleep(0.02)
        assert handled(consumer) >= 10
        assert 0 < highest <= 8, highest  # the first reading follows the first batch of 2
        wait_for(lambda: lag(consumer) == 0, timeout=30, what="lag back to 0")


def debezium(
    op: str, row_before: dict | None, row_after: dict | None, ts_ms: int, wrapped: bool = False
) -> bytes:
    payload = {
        "before": row_before,
        "after": row_after,
        "source": {
            "connector": "postgresql",
            "db": "kb",
            "schema": "public",
            "table": "articles",
            "ts_ms": ts_ms,
            "lsn": ts_ms * 10,
        },
        "op": op,
        "ts_ms": ts_ms + 5,
    }
    return json.dumps({"schema": {"type": "struct"}, "payload": payload} if wrapped else payload).encode()


def test_debezium_changes_become_documents(
    sync_settings: Callable[..., Settings], embedder: Embedder
) -> None:
    cdc_topic = "kb.public.articles"
    settings = sync_settings(
        cdc={"topic": cdc_topic, "table": "public.articles", "classification_column": "label", "format": "md"}
    )
    row1 = {
        "id": 1,
        "title": "VPN setup",
        "body": "Install the VPN client and sign in with your badge.",
        "label": "internal",
    }
    row1b = {**row1, "body": "Install the new VPN client from the portal; the old one stops working in May."}
    row2 = {"id": 2, "title": "Payroll", "body": "Salaries are paid on the 25th.", "label": "confidential"}
    row3 = {"id": 3, "title": "Gone", "body": "To be deleted.", "label": None}
    key = lambda i: json.dumps({"id": i}).encode()  # noqa: E731
    produce(
        settings,
        [
            (key(1), debezium("r", None, row1, 1_000, wrapped=True)),  # snapshot
            (key(2), debezium("c", None, row2, 2_000)),
            (key(3), debezium("c", None, row3, 2_500)),
            (key(1), debezium("u", row1, row1b, 3_000)),
            (key(1), debezium("r", None, row1, 1_000)),  # a replayed snapshot: older than the update
            (key(3), debezium("d", row3, None, 4_000)),
            (key(3), None),  # Debezium's tombstone for compaction
            (key(1), debezium("u", row1b, {**row1b, "body": "__debezium_unavailable_value"}, 3_500)),
            (key(1), debezium("t", None, None, 3_600)),
            (
                key(9),
                json.dumps(
                    {
                        "op": "c",
                        "after": {"id": 9, "body": "x"},
                        "source": {"schema": "public", "table": "other", "ts_ms": 5},
                    }
                ).encode(),
            ),
        ],
        topic=cdc_topic,
    )
    with running_consumer(settings, embedder) as (consumer, kb):

        def count(outcome: str) -> float:
            return (
                consumer.metrics.registry.get_sample_value(
                    "dualtrack_sync_events_total", {"topic": cdc_topic, "outcome": outcome}
                )
                or 0.0
            )

        wait_for(
            lambda: sum(count(o) for o in ("applied", "stale", "duplicate", "dead_letter")) >= 9,
            what="cdc handled",
        )
        vpn = kb.store.get_document("cdc-1")
        assert vpn is not None and vpn.title == "VPN setup"
        assert "portal" in " ".join(c.text for c in kb.store.chunks_of("cdc-1", vpn.version))
        payroll = kb.store.get_document("cdc-2")
        assert payroll is not None and payroll.classification.value == "confidential"  # the site's own data
        assert kb.store.get_document("cdc-3") is None and kb.store.count_chunks("cdc-3") == 0
        assert count("stale") == 1 and count("dead_letter") == 3
        hits = kb.search("Where do I get the VPN client?", top_k=1)
        assert hits[0].chunk.doc_id == "cdc-1"
    dlq = read_topic(settings.sync.bootstrap_servers, settings.sync.dlq_topic, expect=3)
    reasons = sorted(reason(m) for m in dlq)
    assert any("REPLICA IDENTITY FULL" in r for r in reasons), reasons
    assert any("TRUNCATE" in r for r in reasons), reasons
    assert any("sync.cdc.table is 'public.articles'" in r for r in reasons), reasons
    assert all(m.value() is None for m in dlq), "a site's own rows are dead-lettered without their content"
