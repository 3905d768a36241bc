"""The sync consumer: knowledge-update (and Debezium) events into this knowledge base.

Delivery is at-least-once and the effect exactly-once:

* offsets are committed only after a batch's knowledge-base writes (and its
  dead-letter records) are done, so a crash re-delivers, never skips;
* applying is idempotent and newest-wins (``services.sync.apply``), so a
  re-delivered, duplicated or out-of-order event changes nothing it should not;
* an event from the sites is applied only if a key in ``sync.trusted_keys`` for the
  origin it names signed it, within the topic's retention (``services.sync.signing``);
* a message that cannot be applied (unsigned, wrongly signed or replayed; not JSON,
  unknown schema version, vectors of the wrong dimension or norm, a refused
  classification, a document another origin owns) goes to the dead-letter topic with
  the reason in its headers, and the consumer moves on (confidential content is
  recorded without its payload);
* the site's own database changes (Debezium, ``sync.cdc``) are read from the site's
  own broker, and their dead letters stay there;
* while the knowledge base is unavailable the batch is retried with back-off and
  nothing is committed;
* SIGTERM finishes the batch in hand, commits it, and leaves the group.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from services.config import Settings
from services.kb.classification import Classification
from services.kb.errors import KBError, StoreTimeout
from services.kb.ingest import Ingestor
from services.kb.service import KnowledgeBase
from services.sync import cdc, events
from services.sync.apply import Applier, Outcome
from services.sync.kafka import (
    client_config,
    consumer_config,
    ensure_topics,
    producer_config,
    serve_token,
    site_client_config,
    topic_configs,
)
from services.sync.metrics import ConsumerMetrics
from services.sync.signing import Rejected, verifier_for

log = logging.getLogger(__name__)

REASON_HEADER = "dualtrack.dlq.reason"
TIMEOUT_PAUSE_S = 5.0
"""The least wait before a batch whose write timed out is sent again."""


@dataclass(frozen=True, slots=True)
class Source:
    """One broker the consumer reads: the cloud's updates topic (signed events from the sites)
    or the site's own Debezium topic (``sync.cdc``, on the premises)."""

    topic: str
    dlq_topic: str
    client: dict[str, Any]
    cdc: bool


@dataclass(slots=True)
class Reader:
    source: Source
    consumer: Consumer
    dlq: Producer


class SyncConsumer:
    """One consumer process for one knowledge base."""

    def __init__(self, settings: Settings, kb: KnowledgeBase, metrics: ConsumerMetrics | None = None) -> None:
        self.settings = settings
        self.sync = settings.sync
        self.kb = kb
        self.metrics = metrics or ConsumerMetrics()
        self.verifier = verifier_for(self.sync)  # no trusted key: refused here, not event by event
        if self.verifier is None:
            log.warning("sync.require_signatures is off: events are applied without checking who sent them")
        self.applier = Applier(settings, kb.store, kb.embedder)
        self.ingestor = Ingestor(settings, kb.embedder, kb.store)  # CDC rows: parse + chunk only
        self.sources = [Source(self.sync.topic, self.sync.dlq_topic, client_config(self.sync), cdc=False)]
        if self.sync.cdc is not None:
            self.sources.append(
                Source(self.sync.cdc.topic, self.sync.cdc.dlq_topic, site_client_config(self.sync), cdc=True)
            )
        self._last_lag = 0.0

    @property
    def topics(self) -> list[str]:
        return [s.topic for s in self.sources]

    def prepare_topics(self) -> None:
        """Create our topics if missing, and hold the updates topic to ``sync.retention_ms``
        (the Debezium topic belongs to Debezium; its dead-letter topic, on the site's broker, is ours)."""
        if not self.sync.create_topics:
            return
        created = ensure_topics(self.sync, topic_configs(self.sync))
        for source in self.sources[1:]:
            dlq = topic_configs(self.sync)[self.sync.dlq_topic]
            created += ensure_topics(self.sync, {source.dlq_topic: dlq}, client=source.client)
        for name in created:
            log.info("created topic %s", name)

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set."""
        self.prepare_topics()
        readers: list[Reader] = []
        try:
            for source in self.sources:
                consumer = Consumer({**consumer_config(self.sync, source.client), "error_cb": _log_error})
                dlq = Producer({**producer_config(self.sync, source.client), "error_cb": _log_error})
                readers.append(Reader(source, consumer, dlq))
                consumer.subscribe([source.topic])
                log.info("consuming %s as group %s", source.topic, self.sync.group_id)
            while not stop.is_set():
                for reader in readers:
                    messages = reader.consumer.consume(self.sync.batch_size, timeout=0.5 / len(readers))
                    if messages:
                        started = time.perf_counter()
                        if self.handle(reader, messages, stop):
                            self.metrics.batch_seconds.observe(time.perf_counter() - started)
                if time.monotonic() - self._last_lag > 5:
                    for reader in readers:
                        self.update_lag(reader.consumer)
        finally:
            for reader in readers:
                reader.consumer.close()  # leaves the group at once: partitions move without a timeout
                reader.dlq.flush(10)

    def handle(self, reader: Reader, messages: Sequence[Message], stop: threading.Event) -> bool:
        """Apply one batch and commit it; False when stopped before it was applied."""
        batch: list[tuple[Message, Any]] = []
        dead: list[tuple[Message, str, bool]] = []
        offsets: dict[tuple[str, int], int] = {}
        cdc_source = reader.source.cdc
        for m in messages:
            if m.error() is not None:
                if m.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka: %s", m.error())
                continue
            offsets[(m.topic(), m.partition())] = m.offset() + 1
            try:
                if cdc_source:
                    assert self.sync.cdc is not None
                    event = cdc.translate(m.value(), m.key(), self.sync.cdc, self.ingestor)
                    if event is not None:
                        batch.append((m, event))
                else:
                    batch.append((m, self._read(m)))
            except Rejected as exc:  # untrusted: recorded with the reason, never copied
                self.metrics.outcome(m.topic(), "dead_letter")
                dead.append((m, str(exc), True))
            except events.InvalidEvent as exc:
                self.metrics.outcome(m.topic(), "dead_letter")
                dead.append((m, str(exc), False))
            except Exception as exc:  # a message that crashes the parser must not crash-loop us
                log.exception("cannot read %s[%d]@%d", m.topic(), m.partition(), m.offset())
                self.metrics.outcome(m.topic(), "dead_letter")
                dead.append((m, f"cannot be read: {type(exc).__name__}: {exc}", False))
        if batch:
            outcomes = self._apply([e for _, e in batch], not cdc_source, stop)
            if outcomes is None:
                return False
            for (m, event), outcome in zip(batch, outcomes, strict=True):
                self.metrics.outcome(m.topic(), outcome.status)
                if outcome.status == "dead_letter":
                    private = outcome.sensitive or (not cdc_source and _confidential(event))
                    dead.append((m, outcome.reason or "unprocessable", private))
        self.metrics.reembedded.inc(self.applier.reembedded_chunks)
        self.applier.reembedded_chunks = 0
        self._dead_letter(reader, dead)
        self._commit(reader.consumer, offsets)
        return True

    def _read(self, m: Message) -> Any:
        """One message of the updates topic as an event: signed by a trusted key of the origin
        it names (checked before the body is parsed), sent within the topic's retention."""
        signer = self.verifier.verify(m.topic(), m.headers(), m.key(), m.value()) if self.verifier else None
        event = events.decode(m.value())
        if signer is not None and event.origin != signer.origin:
            raise Rejected(
                f"forged origin: signed with {signer.origin!r}'s key, but the event names {event.origin!r}"
            )
        if signer is not None and event.revision > (signer.sent_at + self.sync.max_clock_skew_s) * 1e6:
            # a revision is the origin's clock at the change: one past the send time would outrank
            # every later change to the document, the owner's own included
            raise Rejected(
                f"revision {event.revision} is later than the time it was sent "
                f"({int(signer.sent_at * 1e6)} µs since the epoch)"
            )
        if m.key() != events.key(event):
            raise events.InvalidEvent(f"message key {m.key()!r} is not the event's doc_id {event.doc_id!r}")
        return event

    def _apply(self, batch: list[Any], from_sites: bool, stop: threading.Event) -> list[Outcome] | None:
        delay = 0.5
        while True:
            try:
                return self.applier.apply(batch, from_other_sites=from_sites)
            except KBError as exc:
                self.metrics.store_retries.inc()
                if isinstance(exc, StoreTimeout):
                    # the write given up on may still be running (a Lite seal): sent again at
                    # once it would be slower still
                    delay = max(delay, TIMEOUT_PAUSE_S)
                log.warning("knowledge base unavailable (%s); retrying in %.1fs", exc, delay)
                if stop.wait(delay):
                    return None  # stopping: nothing applied for sure, nothing committed
                delay = min(delay * 2, 30.0)

    def _dead_letter(self, reader: Reader, dead: list[tuple[Message, str, bool]]) -> None:
        if not dead:
            return
        dlq = reader.dlq
        failures: list[str] = []

        def report(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        for m, reason, sensitive in dead:
            log.warning("dead-lettering %s[%d]@%d: %s", m.topic(), m.partition(), m.offset(), reason)
            headers = [
                (REASON_HEADER, reason.encode()),
                ("dualtrack.dlq.topic", m.topic().encode()),
                ("dualtrack.dlq.partition", str(m.partition()).encode()),
                ("dualtrack.dlq.offset", str(m.offset()).encode()),
                ("dualtrack.dlq.at", str(time.time()).encode()),
            ]
            # a refused confidential event is recorded, never copied
            value = None if sensitive else m.value()
            if value is not None and len(value) > self.sync.max_message_bytes:
                value = None  # the reason and the coordinates still point at the original
            try:
                dlq.produce(
                    reader.source.dlq_topic, key=m.key(), value=value, headers=headers, on_delivery=report
                )
            except KafkaException as exc:
                failures.append(str(exc))
        dlq.flush(60)
        if failures or len(dlq):
            raise RuntimeError(f"the dead-letter topic did not take {len(dead)} record(s): {failures[:1]}")

    def _commit(self, consumer: Consumer, offsets: dict[tuple[str, int], int]) -> None:
        if not offsets:
            return
        try:
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
            )
        except KafkaException as exc:
            # a rebalance took the partition: its new owner re-applies (idempotently)
            log.warning("offset commit failed (%s); the events will be applied again", exc)

    def update_lag(self, consumer: Consumer) -> None:
        """Events not yet applied, per partition: the high watermark of the last fetch minus
        our position (after ``handle`` every consumed offset is committed). Both are local
        to the client, so a busy loop does not wait on the broker for a metric. A partition
        nothing has been read from yet has no position: its committed offset is asked for
        (after start-up or a rebalance only); one nothing has been fetched from is left out
        until it is."""
        try:
            unknown: list[TopicPartition] = []
            for tp in consumer.position(consumer.assignment()):
                _, high = consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    continue
                if tp.offset < 0:
                    unknown.append(tp)
                    continue
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(high - tp.offset, 0))
                self._last_lag = time.monotonic()
            for tp in consumer.committed(unknown, timeout=5) if unknown else []:
                low, high = consumer.get_watermark_offsets(tp, timeout=5, cached=tp.offset >= 0)
                done = tp.offset if tp.offset >= 0 else low
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(high - done, 0))
                self._last_lag = time.monotonic()
        except KafkaException as exc:
            log.debug("lag not updated: %s", exc)


def rewind(settings: Settings, timeout: float = 30.0) -> dict[str, int]:
    """Move the group's offsets back to the start of its topics (the consumer must be
    stopped). After a restore, the topic is read again and the restored ledger
    lets exactly the newer events apply. Returns events to re-read per topic."""
    sync = settings.sync
    pending: dict[str, int] = {}
    sources = [(sync.topic, client_config(sync))]
    if sync.cdc is not None:
        sources.append((sync.cdc.topic, site_client_config(sync)))
    for topic, client in sources:
        pending.update(_rewind_one(settings, topic, client, timeout))
    return pending


def _rewind_one(settings: Settings, topic: str, client: dict[str, Any], timeout: float) -> dict[str, int]:
    sync = settings.sync
    consumer = Consumer({**consumer_config(sync, client), "error_cb": _log_error})
    try:
        serve_token(consumer, sync)
        try:
            meta = consumer.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise ConnectionError(f"Kafka at {client['bootstrap.servers']} is unreachable: {exc}") from None
        if topic not in meta.topics:
            return {}
        start: list[TopicPartition] = []
        pending = 0
        for p in meta.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            start.append(TopicPartition(topic, p, low))
            pending += high - low
        try:
            consumer.commit(offsets=start, asynchronous=False)
        except KafkaException as exc:
            raise ConnectionError(
                f"cannot rewind group {sync.group_id!r} on {topic!r} ({exc}); stop the consumer first"
            ) from None
        return {topic: pending}
    finally:
        consumer.close()


def _confidential(event: Any) -> bool:
    return getattr(event, "classification", None) is Classification.CONFIDENTIAL


def _log_error(err: Any) -> None:
    log.warning("kafka: %s", err)
