"""Fixtures for the sync tests: events built by hand, settings pointed at the session
broker with a topic and group of their own, signed as the sites sign them, and reading
a topic back."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer, Message, Producer

from services.config import Settings
from services.kb.embedder import Embedder
from services.kb.service import KnowledgeBase
from services.sync import events, signing
from services.sync.consumer import SyncConsumer
from services.sync.metrics import ConsumerMetrics
from tests.support import KafkaBroker


def upsert(
    doc_id: str,
    revision: int,
    texts: Sequence[str],
    *,
    origin: str = "site-a",
    classification: str = "internal",
    vectors: np.ndarray | None = None,
    model: str | None = None,
    title: str | None = None,
) -> events.DocumentUpsert:
    """An upsert whose version is derived from its content (as ingestion derives it)."""
    basis = "\x00".join([doc_id, classification, *texts]).encode()
    embedding = None
    if vectors is not None:
        embedding = events.Embedding(model=model or "unknown-model", dimension=int(vectors.shape[1]))
    return events.DocumentUpsert(
        origin=origin,
        doc_id=doc_id,
        revision=revision,
        version=hashlib.sha256(basis).hexdigest()[:32],
        content_hash=hashlib.sha256(basis).hexdigest(),
        classification=classification,
        source=f"{doc_id}.md",
        title=title or doc_id,
        chunks=[
            events.EventChunk(
                chunk_no=i,
                text=t,
                metadata={"title": title or doc_id, "section": None},
                vector=events.encode_vector(vectors[i]) if vectors is not None else None,
            )
            for i, t in enumerate(texts)
        ],
        embedding=embedding,
    )


def delete(doc_id: str, revision: int, origin: str = "site-a") -> events.DocumentDelete:
    return events.DocumentDelete(origin=origin, doc_id=doc_id, revision=revision)


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


SITES = ("site-a", "site-b", "site-c")
"""The sites of the sync tests; each has its own signing key, trusted by all of them."""


def key_file(keys: Path, origin: str) -> Path:
    """``origin``'s private key in ``keys`` (made on first use, as ``dualtrack sync keygen`` does)."""
    path = keys / f"{origin}.pem"
    if not path.exists():
        signing.generate(path)
    return path


def public_key(keys: Path, origin: str) -> str:
    return signing.public_text(signing.Signer(key_file(keys, origin)).public)


@pytest.fixture(scope="session")
def site_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("site-keys")
    for origin in SITES:
        key_file(keys, origin)
    return keys


@pytest.fixture
def sync_settings(
    make_settings: Callable[..., Settings], kafka_broker: KafkaBroker, site_keys: Path, tmp_path: Any
) -> Callable[..., Settings]:
    """Settings for one site: its own Milvus Lite file, the shared broker, this test's topic,
    its own signing key and the other sites' public keys."""
    topic = f"updates-{uuid.uuid4().hex[:8]}"

    def make(site: str = "b", **sync: Any) -> Settings:
        return make_settings(
            milvus={"uri": str(tmp_path / f"kb-{site}.db")},
            sync={
                "signing_key_file": str(key_file(site_keys, f"site-{site}")),
                "trusted_keys": {o: [public_key(site_keys, o)] for o in SITES},
                "bootstrap_servers": kafka_broker.bootstrap,
                "topic": topic,
                "group_id": f"kb-{site}-{topic}",
                "site_id": f"site-{site}",
                "partitions": 3,
                "replication_factor": 1,
                "session_timeout_ms": 6000,
                "batch_size": 200,
                "metrics_port": 0,
                "outbox_path": str(tmp_path / f"outbox-{site}.db"),
                **sync,
            },
        )

    return make


Headers = list[tuple[str, bytes]]


def signed(settings: Settings, origin: str, key: bytes | None, value: bytes | None) -> Headers:
    """The headers ``origin``'s publisher would send with (key, value)."""
    assert settings.sync.signing_key_file is not None
    return signing.Signer(key_file(settings.sync.signing_key_file.parent, origin)).headers(
        settings.sync.topic, key, value
    )


def produce(
    settings: Settings,
    messages: Sequence[tuple[bytes | None, bytes | None] | tuple[bytes | None, bytes | None, Headers | None]],
    topic: str | None = None,
    bootstrap: str | None = None,
) -> dict[int, int]:
    """Send raw (key, value[, headers]) messages (to the updates brokers unless ``bootstrap``
    names others); returns the last offset written per partition."""
    last: dict[int, int] = {}

    def report(err: Any, msg: Message) -> None:
        assert err is None, err
        last[msg.partition()] = max(last.get(msg.partition(), -1), msg.offset())

    p = Producer(
        {
            "bootstrap.servers": bootstrap or settings.sync.bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
        }
    )
    for key, value, *headers in messages:
        p.produce(
            topic or settings.sync.topic,
            key=key,
            value=value,
            headers=headers[0] if headers else None,
            on_delivery=report,
        )
        p.poll(0)
    assert p.flush(30) == 0
    return last


def send_events(
    settings: Settings, evs: Sequence[events.DocumentUpsert | events.DocumentDelete]
) -> dict[int, int]:
    """Send events as their origins' publishers would: each signed with its origin's key."""
    return produce(settings, signed_messages(settings, evs))


def signed_messages(
    settings: Settings, evs: Sequence[events.DocumentUpsert | events.DocumentDelete]
) -> list[tuple[bytes | None, bytes | None, Headers | None]]:
    out: list[tuple[bytes | None, bytes | None, Headers | None]] = []
    for e in evs:
        key, value = events.key(e), events.encode(e)
        out.append((key, value, signed(settings, e.origin, key, value)))
    return out


def read_topic(bootstrap: str, topic: str, expect: int | None = None, timeout: float = 20.0) -> list[Message]:
    """Every message on ``topic`` (stops at ``expect`` or after a quiet second)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
        }
    )
    c.subscribe([topic])
    out: list[Message] = []
    import time

    deadline = time.monotonic() + timeout
    quiet_since = None
    try:
        while time.monotonic() < deadline:
            batch = [m for m in c.consume(500, timeout=0.5) if m.error() is None]
            out.extend(batch)
            if expect is not None and len(out) >= expect:
                break
            if batch or not out:
                quiet_since = time.monotonic()
            elif expect is None and quiet_since and time.monotonic() - quiet_since > 1.5:
                break
    finally:
        c.close()
    return out


@contextmanager
def running_consumer(settings: Settings, embedder: Embedder) -> Iterator[tuple[SyncConsumer, KnowledgeBase]]:
    """The real consumer in a thread of this process, stopped (gracefully) on exit."""
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    consumer = SyncConsumer(settings, kb, ConsumerMetrics())
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run(stop)
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield consumer, kb
    finally:
        stop.set()
        thread.join(30)
        kb.close()
    assert not thread.is_alive(), "the consumer did not stop"
    assert not errors, errors


def counter(consumer: SyncConsumer, outcome: str) -> float:
    value = consumer.metrics.registry.get_sample_value(
        "dualtrack_sync_events_total", {"topic": consumer.sync.topic, "outcome": outcome}
    )
    return value or 0.0
