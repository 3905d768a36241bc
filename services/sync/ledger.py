"""The sync ledger: per document, the newest change applied to this knowledge base.

It lives beside the chunks in Milvus (``<collection>_sync``, schema in
``services.kb.schema``) so it is exactly as durable as what it describes. A
consumer writes an entry only *after* the document's chunks and registry row, so
a crash in between leaves the old entry and the event is simply applied again
(chunk ids are deterministic: the same rows). Deletes leave a tombstone, so an
upsert older than the delete that arrives later cannot bring the document back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.kb import schema
from services.kb.filters import in_list
from services.kb.store import KnowledgeStore


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    doc_id: str
    revision: int
    origin: str
    version: str
    deleted: bool
    writing: str = ""
    """A version whose chunks were being written when this entry was saved (else empty): if
    the process died there, its rows are known exactly and removed on the next write."""
    writing_chunks: int = 0

    @property
    def order(self) -> tuple[int, str]:
        return (self.revision, self.origin)


class SyncLedger:
    """Reads and writes ``<collection>_sync`` through the store's connection."""

    def __init__(self, store: KnowledgeStore) -> None:
        self.store = store
        self.name = schema.ledger_name(store.collection)
        self._ready = False

    def ensure(self) -> None:
        """Create the ledger collection on first use (idempotent)."""
        if not self._ready:
            self.store.ensure_ledger()
            self._ready = True

    def get(self, doc_ids: Iterable[str]) -> dict[str, LedgerEntry]:
        ids = sorted(set(doc_ids))
        if not ids:
            return {}
        self.ensure()
        out: dict[str, LedgerEntry] = {}
        for start in range(0, len(ids), 1000):
            rows = self.store.call(
                "query",
                self.store.client.query,
                self.name,
                filter=in_list(schema.DOC_ID, ids[start : start + 1000]),
                output_fields=list(schema.LEDGER_OUTPUT_FIELDS),
            )
            for r in rows:
                out[r[schema.DOC_ID]] = LedgerEntry(
                    doc_id=r[schema.DOC_ID],
                    revision=int(r[schema.REVISION]),
                    origin=r[schema.ORIGIN],
                    version=r[schema.VERSION],
                    deleted=bool(r[schema.DELETED]),
                    writing=r[schema.WRITING],
                    writing_chunks=int(r[schema.WRITING_CHUNKS]),
                )
        return out

    def put(self, entries: Sequence[LedgerEntry]) -> None:
        if not entries:
            return
        self.ensure()
        rows = [
            {
                schema.DOC_ID: e.doc_id,
                schema.REVISION: e.revision,
                schema.ORIGIN: e.origin[:128],
                schema.VERSION: e.version,
                schema.DELETED: e.deleted,
                schema.WRITING: e.writing,
                schema.WRITING_CHUNKS: e.writing_chunks,
                schema.MARKER: [0.0] * schema.MARKER_DIM,
            }
            for e in entries
        ]
        self.store.upsert(self.name, rows)
