"""The consumer against a real Kafka-protocol broker: hostile streams end in the right
state, bad messages land on the dead-letter topic with their reason, and the consumer
keeps going; Debezium envelopes become documents."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from services.config import ConfigError, Settings
from services.kb.embedder import Embedder
from services.kb.service import KnowledgeBase
from services.sync import events, signing
from services.sync.consumer import REASON_HEADER, SyncConsumer, rewind
from services.sync.kafka import ensure_topics, topic_configs
from tests.services.sync.conftest import (
    counter,
    delete,
    key_file,
    produce,
    read_topic,
    running_consumer,
    send_events,
    signed,
    unit_vectors,
    upsert,
)
from tests.support import KafkaBroker


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
    sync_settings: Callable[..., Settings], embedder: Embedder, tmp_path: Path
) -> None:
    settings = sync_settings()
    dim = embedder.dimension
    good_vectors = unit_vectors(2, dim, seed=7)
    stream: list[tuple[bytes | None, bytes | None, Any]] = []

    def add(e: Any) -> None:
        raw(events.key(e), events.encode(e), e.origin)

    def raw(key: bytes | None, value: bytes | None, origin: str | None = "site-a") -> None:
        stream.append((key, value, signed(settings, origin, key, value) if origin else None))

    v1 = upsert("travel", 10, ["Economy class for flights under six hours."])
    v2 = upsert("travel", 20, ["Business class above six hours.", "Book through the portal."])
    add(v1), add(v2), add(v1), add(v2)  # duplicated and out of order
    memo = upsert("memo", 10, ["Quarterly numbers."])
    add(memo), add(delete("memo", 11)), add(memo)  # a delete racing a redelivered upsert
    add(upsert("vectors", 5, ["a.", "b."], vectors=good_vectors, model=embedder.model_id))
    raw(b"junk", b"{not json")
    v3 = json.loads(events.encode(upsert("future", 1, ["x."])))
    v3["schema_version"] = 2
    raw(b"future", json.dumps(v3).encode())
    wrong = json.loads(
        events.encode(upsert("wrongdim", 1, ["y."], vectors=unit_vectors(1, dim, 8), model="m"))
    )
    wrong["embedding"]["dimension"] = dim + 1  # vectors disagree with the declared dimension
    raw(b"wrongdim", json.dumps(wrong).encode())
    raw(b"empty", None)
    add(upsert("secret", 1, ["Falcon terms."], classification="confidential"))
    # forgeries: each a well-formed event that must not be applied
    unsigned = upsert("unsigned", 1, ["Wire the payment to the new account."])
    raw(events.key(unsigned), events.encode(unsigned), origin=None)
    tampered = upsert("tampered", 1, ["Parking is on level two."])
    k, v = events.key(tampered), events.encode(tampered)
    stream.append((k, v.replace(b"level two", b"level six"), signed(settings, "site-a", k, v)))
    stranger = upsert("stranger", 1, ["Signed by a key nobody trusts."], origin="site-x")
    k, v = events.key(stranger), events.encode(stranger)
    stream.append((k, v, signing.Signer(key_file(tmp_path, "site-x")).headers(settings.sync.topic, k, v)))
    impostor = upsert("impostor", 1, ["Site c says so."], origin="site-c")
    k, v = events.key(impostor), events.encode(impostor)
    stream.append((k, v, signed(settings, "site-a", k, v)))  # site-a's key speaking for site-c
    replayed = upsert("replayed", 1, ["An event captured eight days ago."])
    k, v = events.key(replayed), events.encode(replayed)
    long_ago = (time.time_ns() // 1000) - 8 * 24 * 3600 * 10**6
    key_a = signing.Signer(key_file(settings.sync.signing_key_file.parent, "site-a"))
    stream.append((k, v, key_a.headers(settings.sync.topic, k, v, sent_at=long_ago)))
    scaled = json.loads(events.encode(upsert("scaled", 1, ["x."], vectors=good_vectors[:1], model="m")))
    scaled["chunks"][0]["vector"] = events.encode_vector(good_vectors[0] * 2)
    raw(b"scaled", json.dumps(scaled).encode())
    add(upsert("owned", 1, ["Site a wrote this."]))
    add(upsert("owned", 2, ["Site c overwrites it."], origin="site-c"))  # not site c's to change
    add(upsert("forever", 2**62, ["A revision no later change could ever beat."]))
    add(upsert("mine", 1, ["Site b never published this."], origin="site-b"))  # this consumer's site
    add(upsert("after-the-bad-ones", 1, ["The consumer kept going."]))
    refused = {b"junk", b"future", b"wrongdim", b"empty", b"secret", b"unsigned", b"tampered"}
    refused |= {b"stranger", b"impostor", b"replayed", b"scaled", b"owned", b"forever", b"mine"}
    # a topic made before the retention was finite: the consumer sets it on start
    ensure_topics(
        settings.sync,
        {settings.sync.topic: {**topic_configs(settings.sync)[settings.sync.topic], "retention.ms": "-1"}},
    )
    produce(settings, stream)

    with running_consumer(settings, embedder) as (consumer, kb):
        wait_for(lambda: handled(consumer) >= len(stream), what="every message handled")
        assert kb.store.get_document("travel").version == v2.version
        assert kb.store.count_chunks("travel") == 2
        assert kb.store.get_document("memo") is None and kb.store.count_chunks("memo") == 0
        assert kb.store.count_chunks("vectors") == 2
        assert kb.store.get_document("after-the-bad-ones") is not None
        for doc in ("future", "wrongdim", "secret", "unsigned", "tampered", "stranger", "impostor"):
            assert kb.store.get_document(doc) is None
        assert kb.store.get_document("replayed") is None and kb.store.get_document("scaled") is None
        owned = kb.store.get_document("owned")
        assert owned is not None and owned.metadata["synced_from"] == "site-a"
        assert "Site a wrote" in kb.store.chunks_of("owned", owned.version)[0].text
        assert counter(consumer, "dead_letter") == len(refused)
        assert counter(consumer, "applied") + counter(consumer, "stale") + counter(
            consumer, "duplicate"
        ) == len(stream) - len(refused)

    dlq = read_topic(settings.sync.bootstrap_servers, settings.sync.dlq_topic, expect=len(refused))
    by_key = {m.key(): m for m in dlq}
    admin = AdminClient({"bootstrap.servers": settings.sync.bootstrap_servers})
    (described,) = admin.describe_configs([ConfigResource("topic", settings.sync.topic)]).values()
    config = {name: entry.value for name, entry in described.result().items()}
    assert config["cleanup.policy"] == "delete"  # never compacted
    assert config["retention.ms"] == str(7 * 24 * 3600 * 1000)  # the setting, not the topic's history
    assert set(by_key) == refused
    assert "not JSON" in reason(by_key[b"junk"]) and by_key[b"junk"].value() == b"{not json"
    assert "schema_version 2 is not supported" in reason(by_key[b"future"])
    assert f"{dim}-d vector but embedding.dimension is {dim + 1}" in reason(by_key[b"wrongdim"])
    assert "empty message" in reason(by_key[b"empty"])
    assert "confidential" in reason(by_key[b"secret"])
    assert by_key[b"secret"].value() is None, "a refused confidential event is never copied"
    assert reason(by_key[b"unsigned"]).startswith("unsigned: no dualtrack.key_id")
    assert reason(by_key[b"tampered"]).startswith("wrongly signed: the signature does not match 'site-a'")
    assert "not in sync.trusted_keys" in reason(by_key[b"stranger"])
    assert reason(by_key[b"impostor"]) == (
        "forged origin: signed with 'site-a''s key, but the event names 'site-c'"
    )
    assert reason(by_key[b"replayed"]).startswith("replayed: sent 192.0 h ago")
    assert "chunk 0 has a vector of norm 2" in reason(by_key[b"scaled"])
    assert "'owned' belongs to 'site-a' here: 'site-c' may not replace" in reason(by_key[b"owned"])
    assert "revision 4611686018427387904 is later than the time it was sent" in reason(by_key[b"forever"])
    assert "names this site ('site-b') as its origin, but this site did not publish it" in reason(
        by_key[b"mine"]
    )
    for untrusted in (b"unsigned", b"tampered", b"stranger", b"impostor", b"replayed", b"forever"):
        assert by_key[untrusted].value() is None, f"{untrusted!r}: an untrusted message is never copied"
    assert config["segment.ms"] == str(21 * 3600 * 1000)  # an eighth of the retention
    headers = dict(by_key[b"junk"].headers())
    assert headers["dualtrack.dlq.topic"] == settings.sync.topic.encode()


def test_shared_writers_may_change_what_another_origin_owns(
    sync_settings: Callable[..., Settings], embedder: Embedder
) -> None:
    """Sites that edit the same documents say so (``sync.shared_writers``); newest wins among
    them, and the document stays its owner's."""
    settings = sync_settings(shared_writers=["site-c"])
    first = upsert("rota", 1, ["Site a drafted the rota."])
    second = upsert("rota", 2, ["Site c revised the rota."], origin="site-c")
    send_events(settings, [first, second])
    send_events(settings, [upsert("rota", 3, ["Site a settled the rota."])])
    send_events(settings, [upsert("memo", 1, ["Site c's own memo."], origin="site-c")])
    send_events(settings, [upsert("memo", 2, ["Site a may not touch it."])])  # a is no shared writer
    with running_consumer(settings, embedder) as (consumer, kb):
        wait_for(lambda: handled(consumer) >= 5, what="5 handled")
        assert counter(consumer, "applied") == 4 and counter(consumer, "dead_letter") == 1
        rota = kb.store.get_document("rota")
        assert rota is not None and rota.metadata["synced_from"] == "site-a"
        assert "settled" in kb.store.chunks_of("rota", rota.version)[0].text
        memo = kb.store.get_document("memo")
        assert memo is not None and "own memo" in kb.store.chunks_of("memo", memo.version)[0].text


def test_a_consumer_without_trusted_keys_refuses_to_start(
    sync_settings: Callable[..., Settings], embedder: Embedder
) -> None:
    settings = sync_settings(trusted_keys={})
    kb = KnowledgeBase(settings, embedder=embedder)
    with pytest.raises(ConfigError, match="sync.trusted_keys is empty"):
        SyncConsumer(settings, kb)
    lab = sync_settings(trusted_keys={}, require_signatures=False)
    send_events(lab, [upsert("lab", 1, ["Unsigned events apply only where signatures are off."])])
    produce(lab, [(b"lab2", events.encode(upsert("lab2", 1, ["No headers at all."])))])
    with running_consumer(lab, embedder) as (consumer, kb):
        wait_for(lambda: handled(consumer) >= 2, what="2 handled")
        assert counter(consumer, "applied") == 2


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
    sync_settings: Callable[..., Settings], embedder: Embedder, site_kafka_broker: KafkaBroker
) -> None:
    """Debezium writes to the site's own broker: the consumer reads the CDC topic there (and
    the updates topic from the other, the cloud's), and dead-letters refused rows there too."""
    cdc_topic = "kb.public.articles"
    site = site_kafka_broker.bootstrap
    settings = sync_settings(
        cdc={
            "bootstrap_servers": site,
            "topic": cdc_topic,
            "table": "public.articles",
            "classification_column": "label",
            "format": "md",
        }
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
        bootstrap=site,
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
    dlq = read_topic(site, f"{cdc_topic}.dlq", expect=3)
    reasons = sorted(reason(m) for m in dlq)
    assert any("REPLICA IDENTITY FULL" in r for r in reasons), reasons
    assert any("TRUNCATE" in r for r in reasons), reasons
    assert any("sync.cdc.table is 'public.articles'" in r for r in reasons), reasons
    assert all(m.value() is not None for m in dlq), "on the site's broker a refused row keeps its content"
    cloud = read_topic(settings.sync.bootstrap_servers, settings.sync.dlq_topic, timeout=3)
    assert not [m for m in cloud if m.topic() == cdc_topic or b"articles" in (m.value() or b"")]
    assert set(rewind(settings)) == {settings.sync.topic, cdc_topic}  # each on its own broker
