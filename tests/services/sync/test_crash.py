"""kill -9 in the middle of 5,000 events, restart: the knowledge base ends exactly in
the state the event stream describes -- nothing lost, no chunk twice. The consumer
runs the way the kb_sync unit runs it (``python -m services.sync``) against a Milvus
Lite server; SIGTERM then stops it cleanly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition
from pymilvus import MilvusClient

from services.config import PACKAGED_MODEL, load_settings
from services.kb import schema
from services.kb.ingest import chunk_id
from services.sync import events
from tests.services.sync.conftest import (
    SITES,
    delete,
    key_file,
    produce,
    public_key,
    signed_messages,
    unit_vectors,
    upsert,
)
from tests.support import ROOT, KafkaBroker, MilvusServer, free_port

DOCS = 500
EVENTS = 5000
DIM = 384  # the packaged model's


def stream(seed: int = 11) -> list[Any]:
    """Per document, revisions in order (one producer, one partition per key); documents
    interleaved at random; about one event in seven a delete."""
    rng = random.Random(seed)
    per_doc = EVENTS // DOCS
    queues = {f"doc-{d:04d}": list(range(1, per_doc + 1)) for d in range(DOCS)}
    out = []
    while queues:
        doc_id = rng.choice(sorted(queues))
        revision = queues[doc_id].pop(0)
        if not queues[doc_id]:
            del queues[doc_id]
        if rng.random() < 0.15:
            out.append(delete(doc_id, revision))
        else:
            n = rng.randint(1, 3)
            texts = [f"{doc_id} revision {revision} part {i} {rng.random():.6f}." for i in range(n)]
            vectors = unit_vectors(n, DIM, seed=rng.randrange(1 << 30))
            out.append(upsert(doc_id, revision, texts, vectors=vectors, model=PACKAGED_MODEL))
    return out


def expected_state(evs: list[Any]) -> dict[str, events.DocumentUpsert]:
    last: dict[str, Any] = {}
    for e in evs:
        last[e.doc_id] = e
    return {d: e for d, e in last.items() if isinstance(e, events.DocumentUpsert)}


def handled(port: int) -> float:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dualtrack_sync_events_total{")
    )


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return {
            tp.partition: tp.offset
            for tp in c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        }
    finally:
        c.close()


@pytest.fixture
def milvus_server(tmp_path: Path) -> Iterator[MilvusServer]:
    """A Milvus Lite server of this test's own: the session's is shared with many idle
    connections of this process, and this test loads it hard."""
    (tmp_path / "milvus").mkdir()
    server = MilvusServer(tmp_path / "milvus" / "data").start()
    yield server
    server.stop()


def test_kill_9_mid_stream_then_restart_gives_the_exact_state(
    kafka_broker: KafkaBroker, milvus_server: MilvusServer, site_keys: Path, tmp_path: Path
) -> None:
    topic = f"crash-{uuid.uuid4().hex[:8]}"
    collection = f"crash_{uuid.uuid4().hex[:8]}"
    group = f"kb-{topic}"
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DUALTRACK_")},
        "HF_HUB_OFFLINE": "1",
        "DUALTRACK_MILVUS__URI": milvus_server.uri,
        "DUALTRACK_MILVUS__COLLECTION": collection,
        "DUALTRACK_SYNC__BOOTSTRAP_SERVERS": kafka_broker.bootstrap,
        "DUALTRACK_SYNC__TOPIC": topic,
        "DUALTRACK_SYNC__GROUP_ID": group,
        "DUALTRACK_SYNC__PARTITIONS": "3",
        "DUALTRACK_SYNC__REPLICATION_FACTOR": "1",
        "DUALTRACK_SYNC__SESSION_TIMEOUT_MS": "6000",
        "DUALTRACK_SYNC__BATCH_SIZE": "100",
        "DUALTRACK_SYNC__METRICS_PORT": str(port),
        "DUALTRACK_SYNC__TRUSTED_KEYS": json.dumps({o: [public_key(site_keys, o)] for o in SITES}),
    }
    evs = stream()
    assert len(evs) == EVENTS
    settings = load_settings(
        sync={
            "bootstrap_servers": kafka_broker.bootstrap,
            "topic": topic,
            "partitions": 3,
            "replication_factor": 1,
            "signing_key_file": str(key_file(site_keys, "site-a")),
        }
    )
    from services.sync.kafka import ensure_topics

    ensure_topics(settings.sync, {topic: {}})
    last = produce(settings, signed_messages(settings, evs))
    end = {p: o + 1 for p, o in last.items()}

    def start() -> subprocess.Popen[bytes]:
        log = open(tmp_path / "consumer.log", "ab")  # noqa: SIM115
        return subprocess.Popen(
            [sys.executable, "-m", "services.sync"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )

    first = start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and handled(port) < 1000:
        assert first.poll() is None, (tmp_path / "consumer.log").read_text()[-3000:]
        time.sleep(0.05)
    at_kill = handled(port)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert 1000 <= at_kill < EVENTS, f"the kill was not mid-stream ({at_kill} handled)"
    done_before = sum(max(o, 0) for o in committed(kafka_broker.bootstrap, group, topic, 3).values())
    assert done_before < EVENTS

    second = start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            offsets = committed(kafka_broker.bootstrap, group, topic, 3)
            if all(offsets.get(p, -1) >= o for p, o in end.items()):
                break
            assert second.poll() is None, (tmp_path / "consumer.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            raise AssertionError(f"not caught up: {offsets} vs {end}")
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, "SIGTERM must stop the consumer cleanly"
    finally:
        if second.poll() is None:
            second.kill()

    expected = expected_state(evs)
    client = MilvusClient(uri=milvus_server.uri, dedicated=True, timeout=60)
    try:
        registry = client.query(
            schema.registry_name(collection),
            filter='doc_id != ""',
            output_fields=["doc_id", "version", "chunks"],
            limit=16384,
        )
        assert {r["doc_id"]: r["version"] for r in registry} == {d: e.version for d, e in expected.items()}
        rows = client.query(
            collection, filter='doc_id != ""', output_fields=["id", "doc_id", "version"], limit=16384
        )
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)), "a chunk was stored twice"
        want = {chunk_id(d, e.version, c.chunk_no) for d, e in expected.items() for c in e.chunks}
        assert set(ids) == want
    finally:
        client.close()
