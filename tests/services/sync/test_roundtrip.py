"""Two sites through a real broker: what site A ingests (and may share) site B can
answer from; what is confidential never reaches the topic."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from services.config import GatewaySettings, Settings
from services.kb.access import EVERYTHING
from services.kb.classification import Classification
from services.kb.embedder import Embedder
from services.kb.service import KnowledgeBase
from services.sync.publisher import Publisher
from tests.services.sync.conftest import counter, read_topic, running_consumer
from tests.services.sync.test_consumer import wait_for
from tests.support import SAMPLES, ingest_samples

QUERIES = [
    "How long do I have to submit travel expenses?",
    "What should I do during a security incident?",
    "How does database failover work?",
    "What battery life do the robots have?",
]


@pytest.fixture
def site_a(
    sync_settings: Callable[..., Settings], embedder: Embedder
) -> Iterator[tuple[KnowledgeBase, Publisher]]:
    settings = sync_settings("a", publish=True)
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    publisher = Publisher(settings, lambda: kb.store, lambda: kb.embedder.model_id)
    kb.listener = publisher
    publisher.start()
    yield kb, publisher
    publisher.close()
    kb.close()


def published(publisher: Publisher, kind: str) -> float:
    return (
        publisher.metrics.registry.get_sample_value("dualtrack_sync_published_total", {"type": kind}) or 0.0
    )


def test_site_b_answers_like_site_a(
    site_a: tuple[KnowledgeBase, Publisher], sync_settings: Callable[..., Settings], embedder: Embedder
) -> None:
    kb_a, publisher = site_a
    documents = ingest_samples(kb_a)
    assert publisher.drain(30)
    shared = [
        d for d in kb_a.store.list_documents(reader=EVERYTHING) if d.classification.value != "confidential"
    ]
    assert len(shared) == documents - 1 and published(publisher, "upsert") == len(shared)

    with running_consumer(sync_settings("b"), embedder) as (consumer, kb_b):
        wait_for(lambda: counter(consumer, "applied") >= len(shared), what="site A's documents applied on B")
        assert {d.doc_id: d.version for d in kb_b.store.list_documents(reader=EVERYTHING)} == {
            d.doc_id: d.version for d in shared
        }
        for query in QUERIES:
            a = [(h.chunk.id, round(h.score, 4)) for h in kb_a.search(query, top_k=3)]
            b = [(h.chunk.id, round(h.score, 4)) for h in kb_b.search(query, top_k=3)]
            assert a == b, query
        # shipped vectors: nothing was embedded again on B
        assert consumer.metrics.registry.get_sample_value("dualtrack_sync_reembedded_chunks_total") == 0

        # a delete on A reaches B
        doc = shared[0].doc_id
        assert kb_a.ingestor.delete(doc)
        assert publisher.drain(30)
        wait_for(lambda: kb_b.store.get_document(doc) is None, what="the delete applied on B")
        assert kb_b.store.count_chunks(doc) == 0


def test_confidential_never_reaches_the_topic(
    site_a: tuple[KnowledgeBase, Publisher], sync_settings: Callable[..., Settings]
) -> None:
    kb_a, publisher = site_a
    ingest_samples(kb_a)
    secret_path = SAMPLES / "confidential" / "project-falcon-acquisition.md"
    secret_id = kb_a.ingestor.ingest_path(secret_path, root=SAMPLES).doc_id
    assert kb_a.store.get_document(secret_id).classification.value == "confidential"
    # an internal document re-labelled confidential: its earlier copy is retracted, not updated
    handbook = SAMPLES / "handbook" / "employee-handbook.md"
    handbook_id = kb_a.ingestor.ingest_path(handbook, root=SAMPLES).doc_id
    kb_a.ingestor.ingest_path(handbook, root=SAMPLES, classification=Classification.CONFIDENTIAL)
    # a confidential document deleted: nothing to retract, its id stays on site
    assert kb_a.ingestor.delete(secret_id)
    assert publisher.drain(30)

    settings = sync_settings("a")
    messages = read_topic(settings.sync.bootstrap_servers, settings.sync.topic)
    bodies = [json.loads(m.value()) for m in messages]
    assert bodies and all(
        b["classification"] != "confidential" for b in bodies if b["type"] == "document.upsert"
    )
    assert secret_id not in {b["doc_id"] for b in bodies}
    secret_text = secret_path.read_text().split("\n\n")[1].strip()[:40]
    assert secret_text and all(secret_text.encode() not in m.value() for m in messages)
    handbook_events = [b["type"] for b in bodies if b["doc_id"] == handbook_id]
    assert handbook_events == ["document.upsert", "document.delete"]
    withheld = publisher.metrics.registry.get_sample_value(
        "dualtrack_sync_withheld_total", {"classification": "confidential"}
    )
    assert withheld == 2


def test_events_written_while_the_broker_is_down_are_sent_later(
    sync_settings: Callable[..., Settings], embedder: Embedder, tmp_path
) -> None:
    from tests.support import KafkaBroker

    broker = KafkaBroker(tmp_path).start()
    settings = sync_settings("a", publish=True, bootstrap_servers=broker.bootstrap)
    broker.stop()  # down before the first write
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    publisher = Publisher(settings, lambda: kb.store, lambda: kb.embedder.model_id)
    kb.listener = publisher
    try:
        result = kb.ingestor.ingest_path(SAMPLES / "products" / "robot-fleet-faq.md", root=SAMPLES)
        assert result.status == "ingested"  # the local write does not wait for the broker
        assert publisher.outbox.count() == 1
        publisher.close(timeout=2)  # the process stops with the event unsent
        # a restarted gateway finds it in the outbox and sends it once the broker is back
        broker = KafkaBroker(tmp_path)
        broker.port = int(settings.sync.bootstrap_servers.rsplit(":", 1)[1])
        broker.start()
        publisher = Publisher(settings, lambda: kb.store, lambda: kb.embedder.model_id)
        assert publisher.outbox.count() == 1
        assert publisher.drain(60)
        messages = read_topic(broker.bootstrap, settings.sync.topic, expect=1)
        assert [json.loads(m.value())["doc_id"] for m in messages] == [result.doc_id]
        publisher.close()
    finally:
        kb.close()
        broker.stop()


def test_the_gateway_publishes_when_configured(
    sync_settings: Callable[..., Settings], embedder: Embedder
) -> None:
    from services.gateway.app import create_app
    from tests.support import serve, wait_ready

    settings = sync_settings("a", publish=True)
    settings = settings.model_copy(update={"gateway": GatewaySettings(api_key="test-key-0123456789")})
    auth = {"Authorization": "Bearer test-key-0123456789"}
    kb = KnowledgeBase(settings, embedder=embedder)
    with serve(create_app(settings, kb)) as url:
        wait_ready(url)
        path = SAMPLES / "runbooks" / "database-failover.txt"
        r = httpx.post(
            f"{url}/v1/documents", files={"file": (path.name, path.read_bytes())}, headers=auth, timeout=60
        )
        assert r.status_code == 201, r.text
        doc_id = r.json()["doc_id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and 'dualtrack_sync_published_total{type="upsert"} 1.0' not in (
            text := httpx.get(f"{url}/metrics", headers=auth, timeout=5).text
        ):
            time.sleep(0.2)
        assert 'dualtrack_sync_published_total{type="upsert"} 1.0' in text
        assert "dualtrack_sync_outbox_pending 0.0" in text
    messages = read_topic(settings.sync.bootstrap_servers, settings.sync.topic, expect=1)
    assert json.loads(messages[0].value())["doc_id"] == doc_id


def test_publish_existing_sends_what_a_site_already_holds(
    sync_settings: Callable[..., Settings], embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from dualtrack.cli import app

    settings = sync_settings("a")
    kb = KnowledgeBase(settings, embedder=embedder)  # ingested before publishing was turned on
    kb.start()
    ingest_samples(kb)
    stored = {d.doc_id: d for d in kb.store.list_documents(reader=EVERYTHING)}
    shareable = {d for d, r in stored.items() if r.classification.value != "confidential"}
    vectors = {d: kb.store.vectors_of(d, stored[d].version) for d in shareable}
    kb.close()
    for key, value in {
        "DUALTRACK_MILVUS__URI": settings.milvus.uri,
        "DUALTRACK_SYNC__BOOTSTRAP_SERVERS": settings.sync.bootstrap_servers,
        "DUALTRACK_SYNC__TOPIC": settings.sync.topic,
        "DUALTRACK_SYNC__OUTBOX_PATH": str(settings.sync.outbox_path),
    }.items():
        monkeypatch.setenv(key, value)
    unsigned = CliRunner().invoke(app, ["sync", "publish-existing"])
    assert unsigned.exit_code != 0 and "sync.signing_key_file is unset" in " ".join(unsigned.output.split())
    monkeypatch.setenv("DUALTRACK_SYNC__SIGNING_KEY_FILE", str(settings.sync.signing_key_file))
    result = CliRunner().invoke(app, ["sync", "publish-existing"])
    assert result.exit_code == 0, result.output
    assert f"{len(stored)} documents queued; 1 withheld" in result.output
    messages = read_topic(settings.sync.bootstrap_servers, settings.sync.topic, expect=len(shareable))
    from services.sync import events, signing

    received = {e.doc_id: e for e in (events.decode(m.value()) for m in messages)}
    assert set(received) == shareable
    verifier = signing.verifier_for(settings.sync)
    assert verifier is not None
    signers = {verifier.verify(m.topic(), m.headers(), m.key(), m.value()).origin for m in messages}
    assert signers == {"site-a"}
    for doc_id, event in received.items():
        assert event.version == stored[doc_id].version
        assert event.vectors() is not None
        assert (event.vectors() == vectors[doc_id]).all()


def test_an_event_too_large_goes_without_vectors_or_not_at_all(
    sync_settings: Callable[..., Settings], embedder: Embedder
) -> None:
    from services.sync import events

    settings = sync_settings("a", publish=True, max_message_bytes=64 * 1024)
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    publisher = Publisher(settings, lambda: kb.store, lambda: kb.embedder.model_id)
    kb.listener = publisher
    try:
        # ~45 KB of text fits in 64 KiB; its ~12 vectors (2 KB each in base64) do not
        words = " ".join(f"clause{i} of the building access rules applies to visitors." for i in range(700))
        mid = kb.ingestor.ingest_bytes(words.encode(), "rules.txt", metadata={"n": 1})
        assert mid.status == "ingested" and mid.chunks > 8
        (row,) = publisher.outbox.pending()
        event = events.decode(row[2])
        assert event.embedding is None and all(c.vector is None for c in event.chunks)  # text only
        assert len(row[2]) <= 64 * 1024
        huge = " ".join(
            f"paragraph{i} describes the fire exits on every floor in detail." for i in range(12000)
        )
        big = kb.ingestor.ingest_bytes(huge.encode(), "fire.txt")
        assert big.status == "ingested"  # the local write stands
        assert publisher.outbox.count() == 1  # but the event was not queued
        assert publisher.metrics.registry.get_sample_value("dualtrack_sync_oversize_total") == 1
    finally:
        publisher.close(timeout=5)
        kb.close()
