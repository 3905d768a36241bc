"""Apply change events to one knowledge base, idempotently and newest-wins.

The consumer hands over a batch of decoded events in log order. For each
document only the newest change matters (by ``(revision, origin)``, compared
with the ledger entry of what this store already has), so a batch becomes one
write per document: the version being written noted in the ledger, chunks
upserted under ids derived from ``doc_id`` + ``version`` (a repeat writes the
same rows), the registry flipped, the previous version's rows deleted by primary
key, and the ledger entry written last. A crash anywhere before that leaves the
event to be applied again, with the same result.

A document belongs to one origin: the site it was synced from, or this site for its own
uploads. An event from another origin that would replace or delete it is dead-lettered
unless ``sync.shared_writers`` names that origin (who still never takes it over), so a site
(or a leaked key of one) can never overwrite what another site published. This site's own
events coming back from the topic can only be duplicates or stale, and a document this
site never published is never changed from outside. This site's own database (CDC) is
not held to ownership: its rows are its own.

An event this store must not hold (a classification above ``sync.max_classification``)
is dead-lettered *and* acts as a delete at its revision, so an earlier, permitted
copy of the document does not linger here.

Shipped vectors are used when the sender's model id and dimension equal this
store's; otherwise the chunk text is re-embedded here, exactly as ingestion
would embed it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from services.config import Settings
from services.kb.access import Acl
from services.kb.classification import Classification
from services.kb.embedder import Embedder
from services.kb.errors import KBError, StoreTimeout
from services.kb.ingest import chunk_id, embedding_text
from services.kb.models import Chunk
from services.kb.store import DocumentRecord, KnowledgeStore
from services.sync.events import SYNCED_FROM, DocumentDelete, DocumentUpsert
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

    retries = 3
    """Attempts for one event the store refuses while it answers (a collection still
    loading, a rate limit) before it is dead-lettered."""

    def __init__(self, settings: Settings, store: KnowledgeStore, embedder: Embedder) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self.ledger = SyncLedger(store)
        self.reembedded_chunks = 0

    def apply(self, events: Sequence[Event], *, from_other_sites: bool = True) -> list[Outcome]:
        """Outcomes parallel to ``events``. Raises ``KBError`` while the store is unavailable
        or times out (the caller retries the batch; nothing is committed). An event that still fails
        with the store answering is isolated from its batch, retried, then dead-lettered.
        ``from_other_sites`` applies the classification policy (off for this site's own
        database changes, CDC)."""
        try:
            return self._apply(events, from_other_sites)
        except Exception as exc:
            if self._store_trouble(exc):
                raise
            failure: Exception = exc
        if len(events) == 1:
            return [self._retry(events[0], from_other_sites, failure)]
        log.warning("a batch of %d events failed (%s); applying them one by one", len(events), failure)
        out: list[Outcome] = []
        for event in events:
            out.extend(self.apply([event], from_other_sites=from_other_sites))
        return out

    def _retry(self, event: Event, from_other_sites: bool, failure: Exception) -> Outcome:
        for attempt in range(1, self.retries):
            time.sleep(0.5 * 2**attempt)
            try:
                return self._apply([event], from_other_sites)[0]
            except Exception as exc:
                if self._store_trouble(exc):
                    raise
                failure = exc
        log.error("%s@%d cannot be applied: %s", event.doc_id, event.revision, failure)
        return Outcome("dead_letter", f"cannot be applied here: {type(failure).__name__}: {failure}")

    def _store_trouble(self, exc: Exception) -> bool:
        """The store, not the events, is at fault: it timed out (busy; the write may yet land)
        or does not answer at all. The batch is retried whole; taking it apart would only
        send the same rows again, slower, and dead-letter sound events."""
        return isinstance(exc, StoreTimeout) or (isinstance(exc, KBError) and self.store.ping() is not None)

    def _apply(self, events: Sequence[Event], from_other_sites: bool) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(events)
        known = self.ledger.get(e.doc_id for e in events)
        before = dict(known)
        winners: dict[str, Event] = {}  # doc_id -> the change to write
        winner_at: dict[str, int] = {}
        limit = self.settings.sync.max_classification
        cap = self.settings.ingest.max_chunks_per_document
        owners = self._owners(events, known)
        for i, event in enumerate(events):
            change: Event = event
            refused: Outcome | None = None
            if from_other_sites:
                why = self._not_theirs(event, owners.get(event.doc_id), known.get(event.doc_id))
                if why is not None:
                    outcomes[i] = Outcome("dead_letter", why)
                    continue
            if isinstance(event, DocumentUpsert):
                if from_other_sites and event.classification.rank > limit.rank:
                    refused = Outcome(
                        "dead_letter",
                        f"classification {event.classification.value} is above sync.max_classification "
                        f"{limit.value}: not stored here",
                        sensitive=event.classification is Classification.CONFIDENTIAL,
                    )
                    # it must not be held here: any earlier copy goes, at this revision
                    change = DocumentDelete(
                        origin=event.origin,
                        doc_id=event.doc_id,
                        revision=event.revision,
                        occurred_at=event.occurred_at,
                    )
                elif len(event.chunks) > cap:
                    outcomes[i] = Outcome(
                        "dead_letter",
                        f"{len(event.chunks)} chunks, over ingest.max_chunks_per_document ({cap})",
                    )
                    continue
            current = known.get(event.doc_id)
            if current is not None:
                if change.order < current.order:
                    outcomes[i] = refused or Outcome(
                        "stale", f"older than revision {current.revision} from {current.origin}"
                    )
                    continue
                if change.order == current.order and _same(change, current):
                    outcomes[i] = refused or Outcome("duplicate")
                    continue
            # newest so far (an equal order with other content: the later message wins)
            previous = winner_at.get(event.doc_id)
            if previous is not None and outcomes[previous] is None:
                outcomes[previous] = Outcome("applied", "superseded within the batch")
            winners[event.doc_id] = change
            winner_at[event.doc_id] = i
            if from_other_sites:
                owners.setdefault(event.doc_id, change.origin)  # a shared writer does not take it over
            else:
                owners[event.doc_id] = change.origin  # this site's own database: its rows are its own
            known[event.doc_id] = _entry(change)
            if refused is not None:
                outcomes[i] = refused
        self._write(list(winners.values()), before, owners)
        for i in winner_at.values():
            if outcomes[i] is None:
                outcomes[i] = Outcome("applied")
        return [o for o in outcomes if o is not None]

    def _owners(self, events: Sequence[Event], known: dict[str, LedgerEntry]) -> dict[str, str]:
        """Who owns each document here: the origin a registered document was synced from, this
        site for its own, else the origin of the last change applied (a delete included), unless
        that was a shared writer's: then the id is free again."""
        site = self.settings.sync.origin
        stored = self.store.origins([e.doc_id for e in events])
        owners = {doc: origin or site for doc, origin in stored.items()}
        for doc, entry in known.items():
            # a blank entry is a first write that never finished: it names no one
            if entry.origin and not self._shared(entry.origin):
                owners.setdefault(doc, entry.origin)
        return owners

    def _not_theirs(self, event: Event, owner: str | None, current: LedgerEntry | None) -> str | None:
        """Why another site's event may not change this document here, or None if it may."""
        site = self.settings.sync.origin
        if event.origin == site:
            # this site's own events come back from the topic: they can only be what it published
            if current is None or event.order > current.order:
                return f"names this site ({site!r}) as its origin, but this site did not publish it"
            return None
        if owner is None or owner == event.origin:
            return None
        if owner == site and current is None:
            return f"{event.doc_id!r} is this site's own document, never published: no other site changes it"
        if self._shared(event.origin):
            return None
        return (
            f"{event.doc_id!r} belongs to {owner!r} here: {event.origin!r} may not replace or delete it "
            "(sync.shared_writers)"
        )

    def _shared(self, origin: str) -> bool:
        writers = self.settings.sync.shared_writers
        return "*" in writers or origin in writers

    def _write(
        self, changes: Sequence[Event], before: dict[str, LedgerEntry], owners: dict[str, str]
    ) -> None:
        upserts = [e for e in changes if isinstance(e, DocumentUpsert)]
        deletes = [e.doc_id for e in changes if isinstance(e, DocumentDelete)]
        if upserts:
            registered = self.store.registered([e.doc_id for e in upserts])
            # 1. say what is being written, so a crash leaves its rows findable
            self.ledger.put(
                [
                    replace(
                        before.get(e.doc_id) or _blank(e.doc_id),
                        writing=e.version,
                        writing_chunks=len(e.chunks),
                    )
                    for e in upserts
                ]
            )
            default_acl = self.settings.access.default()
            chunks = [c for e in upserts for c in _chunks(e, default_acl)]
            vectors = self._vectors(upserts, chunks)
            self.store.write_chunks(chunks, vectors, batch=self.settings.ingest.insert_batch)
            site = self.settings.sync.origin
            self.store.activate(*(_record(e, default_acl, owners.get(e.doc_id), site) for e in upserts))
            self.store.delete_chunks(_superseded(upserts, registered, before))
            for e in upserts:
                if (entry := before.get(e.doc_id)) is not None and entry.writing:
                    # a run died mid-write: if it got past the registry flip, the version it
                    # replaced is no longer named anywhere, so every other version goes by filter
                    self.store.purge_stale(e.doc_id, e.version)
        if deletes:
            self.store.delete_documents(deletes)
        self.ledger.put([_entry(e) for e in changes])

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


def _blank(doc_id: str) -> LedgerEntry:
    """A ledger entry for a document nothing has been applied to (older than any event)."""
    return LedgerEntry(doc_id=doc_id, revision=-1, origin="", version="", deleted=False)


def _superseded(
    upserts: Sequence[DocumentUpsert], registered: dict[str, tuple[str, int]], before: dict[str, LedgerEntry]
) -> list[str]:
    """Primary keys of the rows the new versions replace: the previously active version's
    (registry) and a version a crashed run was writing (ledger)."""
    ids: set[str] = set()
    for e in upserts:
        old = [registered.get(e.doc_id, ("", 0))]
        entry = before.get(e.doc_id)
        if entry is not None and entry.writing:
            old.append((entry.writing, entry.writing_chunks))
        for version, count in old:
            if version and version != e.version:
                ids.update(chunk_id(e.doc_id, version, n) for n in range(count))
    return sorted(ids)


def _entry(event: Event) -> LedgerEntry:
    return LedgerEntry(
        doc_id=event.doc_id,
        revision=event.revision,
        origin=event.origin,
        version=event.version if isinstance(event, DocumentUpsert) else "",
        deleted=isinstance(event, DocumentDelete),
    )


def _chunks(event: DocumentUpsert, default_acl: Acl) -> list[Chunk]:
    acl = event.access(default_acl)
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
            acl=acl,
        )
        for c in event.chunks
    ]


def _record(event: DocumentUpsert, default_acl: Acl, owner: str | None, site: str) -> DocumentRecord:
    """The registry row: ``synced_from`` names the owner (the event's origin unless a shared
    writer changed another's document), and is absent when this site owns it."""
    owner = owner or event.origin
    metadata = {k: v for k, v in event.metadata.items() if k != SYNCED_FROM}
    if owner != site:
        metadata[SYNCED_FROM] = owner
    return DocumentRecord(
        doc_id=event.doc_id,
        version=event.version,
        content_hash=event.content_hash,
        classification=event.classification,
        source=event.source,
        title=event.title,
        chunks=len(event.chunks),
        ingested_at=event.occurred_at,
        metadata=metadata,
        acl=event.access(default_acl),
    )
