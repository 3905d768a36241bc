"""Apply change events to one knowledge base, idempotently and newest-wins.

The consumer hands over a batch of decoded events in log order. For each
document only the newest change matters (by ``(revision, origin)``, compared
with the ledger entry of what this store already has), so a batch becomes one
write per document: chunks upserted under ids derived from ``doc_id`` +
``version`` (a repeat writes the same rows), the registry flipped, the other
versions purged, and the ledger entry written last. A crash anywhere before
the ledger write leaves the event to be applied again, with the same result.

Shipped vectors are used when the sender's model id and dimension equal this
store's; otherwise the chunk text is re-embedded here, exactly as ingestion
would embed it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from services.config import Settings
from services.kb.classification import Classification
from services.kb.embedder import Embedder
from services.kb.errors import KBError
from services.kb.ingest import chunk_id, embedding_text
from services.kb.models import Chunk
from services.kb.store import DocumentRecord, KnowledgeStore
from services.sync.events import DocumentDelete, DocumentUpsert
from services.sync.ledger import LedgerEntry, SyncLedger

log = logging.getLogger(__name__)

Status = Literal["applied", "stale", "duplicate", "dead_letter"]
Event = DocumentUpsert | DocumentDelete


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    reason: str | None = None
    sensitive: bool = False
    """The event must not be copied anywhere (the dead-letter record keeps only the reason)."""


class Applier:
    """Writes batches of events into ``store``; one instance per consumer."""

    def __init__(self, settings: Settings, store: KnowledgeStore, embedder: Embedder) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self.ledger = SyncLedger(store)
        self.reembedded_chunks = 0

    def apply(self, events: Sequence[Event], *, from_other_sites: bool = True) -> list[Outcome]:
        """Outcomes parallel to ``events``. Raises ``KBError`` only when the store is
        unavailable (retry the whole batch later); an event the store refuses is
        isolated and dead-lettered. ``from_other_sites`` applies the classification
        policy (off for this site's own database changes, CDC)."""
        failure: Exception
        try:
            return self._apply(events, from_other_sites)
        except KBError as exc:
            if self.store.ping() is not None:
                raise  # the store is down: the caller retries the batch, nothing is committed
            failure = exc
        except Exception as exc:  # an event this code cannot handle must not stop the stream
            log.exception("applying %d event(s) failed", len(events))
            failure = exc
        if len(events) == 1:
            return [Outcome("dead_letter", f"cannot be applied here: {type(failure).__name__}: {failure}")]
        # the store answers, so something in the batch is at fault: isolate it
        log.warning("a batch of %d events failed; applying them one by one", len(events))
        out: list[Outcome] = []
        for event in events:
            out.extend(self.apply([event], from_other_sites=from_other_sites))
        return out

    def _apply(self, events: Sequence[Event], from_other_sites: bool) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(events)
        known = self.ledger.get(e.doc_id for e in events)
        winners: dict[str, int] = {}  # doc_id -> index of the change to write
        limit = self.settings.sync.max_classification
        for i, event in enumerate(events):
            if (
                from_other_sites
                and isinstance(event, DocumentUpsert)
                and event.classification.rank > limit.rank
            ):
                outcomes[i] = Outcome(
                    "dead_letter",
                    f"classification {event.classification.value} is above sync.max_classification "
                    f"{limit.value}: not stored here",
                    sensitive=event.classification is Classification.CONFIDENTIAL,
                )
                continue
            if (
                isinstance(event, DocumentUpsert)
                and len(event.chunks) > self.settings.ingest.max_chunks_per_document
            ):
                outcomes[i] = Outcome(
                    "dead_letter",
                    f"{len(event.chunks)} chunks, over ingest.max_chunks_per_document "
                    f"({self.settings.ingest.max_chunks_per_document})",
                )
                continue
            current = known.get(event.doc_id)
            if current is not None:
                if event.order < current.order:
                    outcomes[i] = Outcome(
                        "stale", f"older than revision {current.revision} from {current.origin}"
                    )
                    continue
                if event.order == current.order and _same(event, current):
                    outcomes[i] = Outcome("duplicate")
                    continue
            # newest so far (an equal order with other content: the later message wins)
            previous = winners.get(event.doc_id)
            if previous is not None:
                outcomes[previous] = Outcome("applied", "superseded within the batch")
            winners[event.doc_id] = i
            known[event.doc_id] = _entry(event)
        self._write([events[i] for i in winners.values()])
        for i in winners.values():
            outcomes[i] = Outcome("applied")
        return [o for o in outcomes if o is not None]

    def _write(self, events: Sequence[Event]) -> None:
        upserts = [e for e in events if isinstance(e, DocumentUpsert)]
        deletes = [e.doc_id for e in events if isinstance(e, DocumentDelete)]
        if upserts:
            chunks = [c for e in upserts for c in _chunks(e)]
            vectors = self._vectors(upserts, chunks)
            self.store.write_chunks(chunks, vectors, batch=self.settings.ingest.insert_batch)
            self.store.activate(*(_record(e) for e in upserts))
            self.store.purge_stale_many({e.doc_id: e.version for e in upserts})
        if deletes:
            self.store.delete_documents(deletes)
        self.ledger.put([_entry(e) for e in events])

    def _vectors(self, upserts: Sequence[DocumentUpsert], chunks: Sequence[Chunk]) -> np.ndarray:
        parts: list[np.ndarray | None] = []
        missing: list[Chunk] = []
        offset = 0
        for e in upserts:
            shipped = e.vectors() if self._compatible(e) else None
            parts.append(shipped)
            if shipped is None:
                missing.extend(chunks[offset : offset + len(e.chunks)])
            offset += len(e.chunks)
        embedded = self.embedder.embed_passages([embedding_text(c) for c in missing]) if missing else None
        self.reembedded_chunks += len(missing)
        out = np.empty((len(chunks), self.store.dimension), dtype=np.float32)
        row = used = 0
        for e, shipped in zip(upserts, parts, strict=True):
            n = len(e.chunks)
            if shipped is not None:
                out[row : row + n] = shipped
            else:
                assert embedded is not None
                out[row : row + n] = embedded[used : used + n]
                used += n
            row += n
        return out

    def _compatible(self, event: DocumentUpsert) -> bool:
        e = event.embedding
        return e is not None and e.model == self.embedder.model_id and e.dimension == self.store.dimension


def _same(event: Event, entry: LedgerEntry) -> bool:
    if isinstance(event, DocumentDelete):
        return entry.deleted
    return not entry.deleted and entry.version == event.version


def _entry(event: Event) -> LedgerEntry:
    return LedgerEntry(
        doc_id=event.doc_id,
        revision=event.revision,
        origin=event.origin,
        version=event.version if isinstance(event, DocumentUpsert) else "",
        deleted=isinstance(event, DocumentDelete),
    )


def _chunks(event: DocumentUpsert) -> list[Chunk]:
    return [
        Chunk(
            id=chunk_id(event.doc_id, event.version, c.chunk_no),
            doc_id=event.doc_id,
            version=event.version,
            chunk_no=c.chunk_no,
            text=c.text,
            classification=event.classification,
            source=event.source,
            page=c.page,
            metadata={**c.metadata, "title": c.metadata.get("title", event.title)},
        )
        for c in event.chunks
    ]


def _record(event: DocumentUpsert) -> DocumentRecord:
    return DocumentRecord(
        doc_id=event.doc_id,
        version=event.version,
        content_hash=event.content_hash,
        classification=event.classification,
        source=event.source,
        title=event.title,
        chunks=len(event.chunks),
        ingested_at=event.occurred_at,
        metadata={**event.metadata, "synced_from": event.origin},
    )
