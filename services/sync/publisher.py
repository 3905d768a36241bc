"""Publish this site's knowledge-base changes (opt-in: ``sync.publish``).

The ingestion path calls :class:`Publisher` after each local write has
succeeded. The classification policy is applied here, before anything is
queued: a document above ``sync.max_classification`` (``confidential`` always)
is never published; if an earlier, publishable version of it was, a delete is
published instead so other sites drop their copy. Everything that may leave
goes through the durable :class:`~services.sync.outbox.Outbox` and a relay
thread with an idempotent, acks=all producer, which signs each message with the site's
key as it sends it (``services.sync.signing``).

Each published change is also written to this store's ledger, so the site's own
events coming back from the topic, and older changes from other sites, are
no-ops here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from prometheus_client import CollectorRegistry

from services.config import Settings
from services.kb.models import Chunk
from services.kb.store import DocumentRecord, KnowledgeStore
from services.sync import events, signing
from services.sync.kafka import producer_config
from services.sync.ledger import LedgerEntry, SyncLedger
from services.sync.metrics import PublisherMetrics
from services.sync.outbox import Outbox

log = logging.getLogger(__name__)


class Publisher:
    """A ``ChangeListener`` for the ingestor; ``start()`` runs the relay, ``close()`` stops it."""

    def __init__(
        self,
        settings: Settings,
        store: Callable[[], KnowledgeStore],
        model_id: Callable[[], str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.sync = settings.sync
        self._signer = signing.signer_for(self.sync)  # before anything is created: refused whole
        self._store = store
        self._model_id = model_id
        self._ledger: SyncLedger | None = None
        self.metrics = PublisherMetrics(registry or CollectorRegistry())
        self.outbox = Outbox(self.sync.outbox_path)
        self.metrics.pending.set(self.outbox.count())
        self._producer = Producer({**producer_config(self.sync), "error_cb": _log_error})
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._relay: threading.Thread | None = None
        self._revision_lock = threading.Lock()
        self._send_lock = threading.Lock()  # the relay and a caller's drain() never send one row twice

    # -- ChangeListener --------------------------------------------------------------------

    def document_written(self, record: DocumentRecord, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        if record.classification.rank > self.sync.max_classification.rank:
            self.metrics.withheld.labels(record.classification.value).inc()
            if self._was_published(record.doc_id):
                log.info("%s is now %s: publishing its deletion", record.doc_id, record.classification.value)
                self.document_deleted(record.doc_id)
            return
        embedding = None
        if self.sync.publish_vectors:
            embedding = events.Embedding(model=self._model_id(), dimension=int(vectors.shape[1]))
        event = events.DocumentUpsert(
            origin=self.sync.origin,
            doc_id=record.doc_id,
            revision=self._next_revision(record.doc_id),
            occurred_at=record.ingested_at,
            version=record.version,
            content_hash=record.content_hash,
            classification=record.classification,
            source=record.source,
            title=record.title[:1000],
            metadata=record.metadata,
            acl=record.acl.stored(),
            chunks=[
                events.EventChunk(
                    chunk_no=c.chunk_no,
                    text=c.text,
                    page=c.page,
                    metadata=c.metadata,
                    vector=events.encode_vector(vectors[i]) if embedding else None,
                )
                for i, c in enumerate(chunks)
            ],
            embedding=embedding,
        )
        self._queue(event)

    def document_deleted(self, doc_id: str) -> None:
        if not self._was_published(doc_id):
            return  # never left the site: nothing to retract, and the id itself stays here
        event = events.DocumentDelete(
            origin=self.sync.origin, doc_id=doc_id, revision=self._next_revision(doc_id)
        )
        self._queue(event)

    def publish_existing(self, on_document: Callable[[DocumentRecord], None] | None = None) -> int:
        """Queue every document this site holds as its own (a site that starts publishing, or
        a topic rebuilt): the same policy as live writes applies. Documents received from
        other sites are theirs to publish and are skipped. Returns documents seen."""
        store = self._store()
        seen = 0
        for record in store.iter_documents():
            seen += 1
            if on_document is not None:
                on_document(record)
            if record.metadata.get(events.SYNCED_FROM):
                continue
            chunks = store.chunks_of(record.doc_id, record.version)
            if len(chunks) != record.chunks:
                log.warning(
                    "%s: %d of %d chunks readable, not published", record.doc_id, len(chunks), record.chunks
                )
                continue
            vectors = store.vectors_of(record.doc_id, record.version)
            current = store.get_document(record.doc_id)
            if current is None or current.version != record.version:
                continue  # changed meanwhile: the gateway publishes the new version itself
            self.document_written(record, chunks, vectors)
        return seen

    # -- internals ----------------------------------------------------------------------------

    @property
    def ledger(self) -> SyncLedger:
        if self._ledger is None:
            self._ledger = SyncLedger(self._store())
        return self._ledger

    def _was_published(self, doc_id: str) -> bool:
        """This site published the document (a synced copy's entry names its origin: deleting
        the copy here is not this site's change to announce)."""
        entry = self.ledger.get([doc_id]).get(doc_id)
        return entry is not None and not entry.deleted and entry.origin == self.sync.origin

    def _next_revision(self, doc_id: str) -> int:
        """The origin clock in microseconds, past anything this store has seen for the document."""
        with self._revision_lock:
            entry = self.ledger.get([doc_id]).get(doc_id)
            now = time.time_ns() // 1000
            return max(now, entry.revision + 1) if entry else now

    def _queue(self, event: events.DocumentUpsert | events.DocumentDelete) -> None:
        value = events.encode(event)
        limit = self.sync.max_message_bytes
        if len(value) > limit and isinstance(event, events.DocumentUpsert) and event.embedding is not None:
            # receivers re-embed the text; better than not sending the document at all
            event = event.model_copy(
                update={
                    "embedding": None,
                    "chunks": [c.model_copy(update={"vector": None}) for c in event.chunks],
                }
            )
            value = events.encode(event)
        if len(value) > limit:
            self.metrics.oversize.inc()
            log.error(
                "%s is %d bytes as an event, over sync.max_message_bytes (%d): not published",
                event.doc_id,
                len(value),
                limit,
            )
            return
        # the outbox first: once the event is safely queued, the ledger may say it was sent
        self.outbox.add(events.key(event), value)
        self.ledger.put(
            [
                LedgerEntry(
                    doc_id=event.doc_id,
                    revision=event.revision,
                    origin=event.origin,
                    version=getattr(event, "version", ""),
                    deleted=isinstance(event, events.DocumentDelete),
                )
            ]
        )
        self.metrics.pending.inc()
        self._wake.set()

    # -- relay ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._relay is None:
            self._relay = threading.Thread(target=self._run, name="sync-relay", daemon=True)
            self._relay.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                while self.send_pending() and not self._stop.is_set():
                    pass
            except Exception:  # the relay must outlive any one failure; events stay queued
                log.exception("sync relay failed; retrying")
                self._stop.wait(2.0)

    def send_pending(self, timeout: float = 30.0) -> int:
        """Send one batch from the outbox and drop what the broker acknowledged;
        returns how many were acknowledged."""
        with self._send_lock:
            return self._send_batch(timeout)

    def _send_batch(self, timeout: float) -> int:
        batch = self.outbox.pending(500)
        if not batch:
            return 0
        acked: list[int] = []

        def delivered(seq: int) -> Callable[[KafkaError | None, Message], None]:
            def report(err: KafkaError | None, msg: Message) -> None:
                if err is None:
                    acked.append(seq)
                    self.metrics.published.labels(_type(msg.value())).inc()
                elif err.code() in _NEVER:
                    self._reject(seq, msg.key(), str(err))
                else:
                    self.metrics.send_errors.inc()
                    log.warning("publishing %s failed: %s (kept in the outbox)", msg.key(), err)

            return report

        for seq, key, value in batch:
            try:
                self._produce(key, value, delivered(seq))
            except KafkaException as exc:  # refused before sending (e.g. too large): never retried
                self._reject(seq, key, str(exc))
        deadline = time.monotonic() + timeout
        while len(self._producer) and time.monotonic() < deadline:
            self._producer.flush(min(1.0, max(deadline - time.monotonic(), 0.0)))
        if len(self._producer):
            # unreachable broker: withdraw this round so the next one does not send it twice;
            # the rows stay in the outbox
            self._producer.purge()
            self._producer.flush(0)
        self.outbox.remove(acked)
        self.metrics.pending.set(self.outbox.count())
        return len(acked)

    def _reject(self, seq: int, key: bytes | None, reason: str) -> None:
        self.outbox.reject(seq, reason)
        self.metrics.rejected.inc()
        log.error("the broker will not take %s (%s): set aside in the outbox's rejected table", key, reason)

    def _produce(
        self, key: bytes, value: bytes, callback: Callable[[KafkaError | None, Message], None]
    ) -> None:
        while True:
            try:
                headers = self._signer.headers(self.sync.topic, key, value) if self._signer else None
                self._producer.produce(
                    self.sync.topic, key=key, value=value, headers=headers, on_delivery=callback
                )
                return
            except BufferError:  # librdkafka's queue is full: let it drain
                self._producer.poll(0.5)

    def drain(self, timeout: float = 30.0) -> bool:
        """Send until the outbox is empty or ``timeout`` passes; True when empty."""
        deadline = time.monotonic() + timeout
        while self.outbox.count() and time.monotonic() < deadline:
            if not self.send_pending(timeout=max(deadline - time.monotonic(), 0.1)):
                time.sleep(0.2)
        return self.outbox.count() == 0

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._relay is not None:
            self._relay.join(timeout)
        self.drain(timeout)
        self._producer.purge()  # what is left stays in the outbox for the next start
        self._producer.flush(0)
        self.outbox.close()


_NEVER = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD}
"""Delivery errors a retry cannot fix; anything else (authorization, an outage) stays
queued and is sent again once the operator or the network has fixed it."""


def _type(value: bytes | None) -> str:
    return "delete" if value and b'"document.delete"' in value else "upsert"


def _log_error(err: Any) -> None:
    log.warning("kafka: %s", err)
