"""The sync consumer: knowledge-update (and Debezium) events into this knowledge base.

Delivery is at-least-once and the effect exactly-once:

* offsets are committed only after a batch's knowledge-base writes (and its
  dead-letter records) are done, so a crash re-delivers, never skips;
* applying is idempotent and newest-wins (``services.sync.apply``), so a
  re-delivered, duplicated or out-of-order event changes nothing it should not;
* a message that cannot be applied (not JSON, unknown schema version, vectors
  that disagree with their declared dimension, a refused classification) goes to
  the dead-letter topic with the reason in its headers, and the consumer moves on
  (confidential content and a site's own database rows are recorded without their
  payload);
* while the knowledge base is unavailable the batch is retried with back-off and
  nothing is committed;
* SIGTERM finishes the batch in hand, commits it, and leaves the group.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from services.config import Settings
from services.kb.classification import Classification
from services.kb.errors import KBError, StoreTimeout
from services.kb.ingest import Ingestor
from services.kb.service import KnowledgeBase
from services.sync import cdc, events
from services.sync.apply import Applier, Outcome
from services.sync.kafka import consumer_config, ensure_topics, producer_config, serve_token, topic_configs
from services.sync.metrics import ConsumerMetrics

log = logging.getLogger(__name__)

REASON_HEADER = "dualtrack.dlq.reason"
TIMEOUT_PAUSE_S = 5.0
"""The least wait before a batch whose write timed out is sent again."""


class SyncConsumer:
    """One consumer process for one knowledge base."""

    def __init__(self, settings: Settings, kb: KnowledgeBase, metrics: ConsumerMetrics | None = None) -> None:
        self.settings = settings
        self.sync = settings.sync
        self.kb = kb
        self.metrics = metrics or ConsumerMetrics()
        self.applier = Applier(settings, kb.store, kb.embedder)
        self.ingestor = Ingestor(settings, kb.embedder, kb.store)  # CDC rows: parse + chunk only
        self._last_lag = 0.0

    @property
    def topics(self) -> list[str]:
        return [self.sync.topic] + ([self.sync.cdc.topic] if self.sync.cdc else [])

    def prepare_topics(self) -> None:
        """Create our topics if missing (the Debezium topic belongs to Debezium)."""
        if self.sync.create_topics:
            created = ensure_topics(self.sync, topic_configs(self.sync))
            for name in created:
                log.info("created topic %s", name)

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set."""
        self.prepare_topics()
        consumer = Consumer({**consumer_config(self.sync), "error_cb": _log_error})
        dlq = Producer({**producer_config(self.sync), "error_cb": _log_error})
        consumer.subscribe(self.topics)
        log.info("consuming %s as group %s", ", ".join(self.topics), self.sync.group_id)
        try:
            while not stop.is_set():
                messages = consumer.consume(self.sync.batch_size, timeout=0.5)
                if messages:
                    started = time.perf_counter()
                    if self.handle(consumer, dlq, messages, stop):
                        self.metrics.batch_seconds.observe(time.perf_counter() - started)
                if time.monotonic() - self._last_lag > 5:
                    self.update_lag(consumer)
        finally:
            consumer.close()  # leaves the group at once: partitions move without waiting for a timeout
            dlq.flush(10)

    def handle(
        self, consumer: Consumer, dlq: Producer, messages: Sequence[Message], stop: threading.Event
    ) -> bool:
        """Apply one batch and commit it; False when stopped before it was applied."""
        updates: list[tuple[Message, Any]] = []
        changes: list[tuple[Message, Any]] = []
        dead: list[tuple[Message, str, bool]] = []
        offsets: dict[tuple[str, int], int] = {}
        for m in messages:
            if m.error() is not None:
                if m.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka: %s", m.error())
                continue
            offsets[(m.topic(), m.partition())] = m.offset() + 1
            try:
                if self.sync.cdc is not None and m.topic() == self.sync.cdc.topic:
                    event = cdc.translate(m.value(), m.key(), self.sync.cdc, self.ingestor)
                    if event is not None:
                        changes.append((m, event))
                else:
                    updates.append((m, events.decode(m.value())))
            except events.InvalidEvent as exc:
                self.metrics.outcome(m.topic(), "dead_letter")
                dead.append((m, str(exc), self._private(m)))
            except Exception as exc:  # a message that crashes the parser must not crash-loop us
                log.exception("cannot read %s[%d]@%d", m.topic(), m.partition(), m.offset())
                self.metrics.outcome(m.topic(), "dead_letter")
                dead.append((m, f"cannot be read: {type(exc).__name__}: {exc}", self._private(m)))
        for batch, from_sites in ((updates, True), (changes, False)):
            if not batch:
                continue
            outcomes = self._apply([e for _, e in batch], from_sites, stop)
            if outcomes is None:
                return False
            for (m, event), outcome in zip(batch, outcomes, strict=True):
                self.metrics.outcome(m.topic(), outcome.status)
                if outcome.status == "dead_letter":
                    private = outcome.sensitive or not from_sites or _confidential(event)
                    dead.append((m, outcome.reason or "unprocessable", private))
        self.metrics.reembedded.inc(self.applier.reembedded_chunks)
        self.applier.reembedded_chunks = 0
        self._dead_letter(dlq, dead)
        self._commit(consumer, offsets)
        return True

    def _private(self, m: Message) -> bool:
        """Dead letters of a site's own database rows (CDC) keep the reason, not the row:
        its classification is unknown until it is parsed."""
        return self.sync.cdc is not None and m.topic() == self.sync.cdc.topic

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

    def _dead_letter(self, dlq: Producer, dead: list[tuple[Message, str, bool]]) -> None:
        if not dead:
            return
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
                    self.sync.dlq_topic, key=m.key(), value=value, headers=headers, on_delivery=report
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
    topics = [sync.topic] + ([sync.cdc.topic] if sync.cdc else [])
    consumer = Consumer({**consumer_config(sync), "error_cb": _log_error})
    try:
        serve_token(consumer, sync)
        try:
            meta = consumer.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise ConnectionError(f"Kafka at {sync.bootstrap_servers} is unreachable: {exc}") from None
        start: list[TopicPartition] = []
        pending: dict[str, int] = {}
        for topic in topics:
            if topic not in meta.topics:
                continue
            for p in meta.topics[topic].partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
                start.append(TopicPartition(topic, p, low))
                pending[topic] = pending.get(topic, 0) + high - low
        if start:
            try:
                consumer.commit(offsets=start, asynchronous=False)
            except KafkaException as exc:
                raise ConnectionError(
                    f"cannot rewind group {sync.group_id!r} ({exc}); stop the consumer first"
                ) from None
        return pending
    finally:
        consumer.close()


def _confidential(event: Any) -> bool:
    return getattr(event, "classification", None) is Classification.CONFIDENTIAL


def _log_error(err: Any) -> None:
    log.warning("kafka: %s", err)
