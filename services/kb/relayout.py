"""Rebuild the knowledge base in the current layout while it keeps serving.

How a document's chunks are stored depends on the release that wrote them: how its text was
chunked, and whether the chunk collection has the BM25 index (a field Milvus cannot add to an
existing collection). ``relayout`` brings every document to the current layout without taking
search down:

1. **build** -- only when the chunk collection lacks the BM25 field. Each registry document's
   text is recovered from its stored chunks (each chunk's repeat of its predecessor's tail
   removed), chunked and embedded as an ingest now would, and written into a new collection
   ``<name>__g<N>`` under the version the registry names, so the registry is right for both
   collections. Documents written meanwhile are caught up, rows of versions no longer active
   are dropped, and the new collection is verified by counts (every document's chunks, and
   the total) before anything switches.
2. **switch** -- the alias ``<name>`` is pointed at the new collection. The first time, the
   old collection is renamed ``<name>__g0`` and the alias created; a request arriving in that
   moment waits for it (``KnowledgeStore``). The old collection is kept, released.
3. **relabel** -- each document is rewritten under the version an ingest now gives it, by the
   ingest's protocol (new rows, registry flip, old rows deleted), reusing its vectors where its
   chunks are already in the current layout, else re-chunked and re-embedded. This is all that
   happens when only the chunking settings changed.

Every step is resumable: a rerun skips what is done. Writers (the gateway, the sync consumer)
may run throughout; a document they write during the relabel step keeps their version.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pymilvus import MilvusClient

from services.config import Settings
from services.kb import schema
from services.kb.embedder import Embedder
from services.kb.errors import KBError
from services.kb.filters import literal
from services.kb.ingest import Ingestor, embedding_text
from services.kb.models import Block, Chunk
from services.kb.store import DocumentRecord, KnowledgeStore

GENERATION = "__g"
MIN_OVERLAP = 16
"""Shortest repeat (characters) taken for the overlap between neighbouring chunks."""

Progress = Callable[[str, int, int], None]
"""``(step, documents done, documents in all)``."""


class RelayoutError(KBError):
    """The rebuild could not finish; the message says where it stopped and what to do."""


@dataclass(frozen=True)
class Relaid:
    documents: int
    chunks_before: int
    chunks_after: int
    built: str | None
    """The collection built and switched to, or None when the served one was kept."""
    kept_as: str | None
    """The collection that served before, kept (drop it once satisfied)."""
    relabelled: int
    reembedded: int


def recovered_blocks(chunks: Sequence[Chunk]) -> list[Block]:
    """The document text behind its chunks (in ``chunk_no`` order), each chunk's repeat of its
    predecessor's tail removed, as blocks carrying each chunk's page and section. What is
    removed is text the previous chunk already holds, so nothing is lost; a document that
    really repeats a passage across a chunk boundary keeps one copy of it."""
    blocks: list[Block] = []
    previous = ""
    for c in sorted(chunks, key=lambda c: c.chunk_no):
        text = c.text[_overlap(previous, c.text) :].strip()
        if text:
            blocks.append(Block(text, page=c.page or None, section=c.metadata.get("section")))
        previous = c.text
    return blocks


def _overlap(previous: str, text: str) -> int:
    """The longest start of ``text`` (whole words, at least ``MIN_OVERLAP`` characters, never
    all of it) that ``previous`` ends with, also at a word boundary; 0 if none."""
    ends = [m.start() for m in re.finditer(r"\s", text)]
    for k in reversed(ends):
        if k < MIN_OVERLAP:
            break
        if (
            k <= len(previous)
            and previous.endswith(text[:k])
            and (k == len(previous) or previous[-k - 1].isspace())
        ):
            return k
    return 0


class _Relayout:
    def __init__(self, settings: Settings, embedder: Embedder, progress: Progress | None) -> None:
        self.settings = settings
        self.embedder = embedder
        self.progress = progress or (lambda *_: None)
        self.store = KnowledgeStore(settings.milvus, embedder.dimension)
        self.ingestor = Ingestor(settings, embedder, self.store)
        self.name = settings.milvus.collection
        self.reembedded = 0
        self.foreign: set[str] = set()
        """Documents another site published (the sync ledger names their origin): their chunks
        and versions are their origin's, so they are carried over as they are, never relabelled."""

    @property
    def client(self) -> MilvusClient:
        return self.store.client

    def run(self) -> Relaid:
        self.store.connect()  # validates; an old collection is served dense meanwhile
        self.foreign = self._foreign()
        before = self.store.count_chunks()
        built = kept = None
        if self.settings.milvus.full_text and not self._has_sparse(self.name):
            built, kept = self._build()
            self.store.full_text, self.store.pending = True, None
        relabelled = self._relabel()
        return Relaid(
            documents=sum(1 for _ in self.store.iter_documents()),
            chunks_before=before,
            chunks_after=self.store.count_chunks(),
            built=built,
            kept_as=kept,
            relabelled=relabelled,
            reembedded=self.reembedded,
        )

    # -- 1. build ----------------------------------------------------------------------------

    def _build(self) -> tuple[str, str]:
        live = self._served()
        target = self._target(live)
        if not self.store.exists(self.client, target):
            self.store.full_text = True
            self.store.create_chunk_collection(self.client, target)
        self.client.load_collection(target)
        while self._catch_up(target):  # until a pass finds nothing written meanwhile
            pass
        self._drop_inactive(target)
        self._verify(target)
        kept = self._switch(live, target)
        return target, kept

    def _served(self) -> str:
        """The collection behind the served name: the alias's target, or the name itself."""
        try:
            return str(self.client.describe_alias(self.name)["collection_name"])
        except Exception:
            return self.name

    def _target(self, live: str) -> str:
        names = self.client.list_collections()
        numbers = [
            int(n[len(self.name + GENERATION) :])
            for n in names
            if re.fullmatch(rf"{self.name}{GENERATION}\d+", n)
        ]
        if live != self.name:
            current = int(live[len(self.name + GENERATION) :])
            pending = [n for n in numbers if n > current]
            return f"{self.name}{GENERATION}{max(pending) if pending else max(numbers) + 1}"
        pending = [n for n in numbers if n > 0]
        return f"{self.name}{GENERATION}{max(pending) if pending else 1}"

    def _catch_up(self, target: str) -> int:
        """Build every registry document whose active version is not complete in ``target``;
        how many were built."""
        records = list(self.store.iter_documents())
        built = 0
        for i, record in enumerate(records, 1):
            fresh = self._layout(record)
            have = self.store.count_chunks(record.doc_id, record.version, into=target)
            if have != len(fresh):
                if have:
                    self._delete(target, f"{schema.DOC_ID} == {literal(record.doc_id)}")
                if record.doc_id in self.foreign:  # as its origin chunked and embedded it
                    vectors = self.store.vectors_of(record.doc_id, record.version)
                    self.store.write_chunks(
                        fresh, vectors, batch=self.settings.ingest.insert_batch, into=target
                    )
                else:
                    self._write(fresh, target)
                built += 1
            self.progress("build", i, len(records))
        return built

    def _drop_inactive(self, target: str) -> None:
        """Rows of a version the registry no longer names (a document replaced or deleted while
        the build ran)."""
        active = {r.doc_id: r.version for r in self.store.iter_documents()}
        stale: set[tuple[str, str]] = set()
        iterator = self.client.query_iterator(
            target, batch_size=4096, filter="", output_fields=[schema.DOC_ID, schema.VERSION]
        )
        try:
            while page := iterator.next():
                stale |= {
                    (r[schema.DOC_ID], r[schema.VERSION])
                    for r in page
                    if active.get(r[schema.DOC_ID]) != r[schema.VERSION]
                }
        finally:
            iterator.close()
        for doc_id, version in sorted(stale):
            self._delete(
                target, f"{schema.DOC_ID} == {literal(doc_id)} and {schema.VERSION} == {literal(version)}"
            )

    def _verify(self, target: str) -> None:
        expected = 0
        for record in self.store.iter_documents():
            fresh = self._layout(record)
            got = self.store.count_chunks(record.doc_id, record.version, into=target)
            if got != len(fresh):
                raise RelayoutError(
                    f"{target!r} holds {got} chunks of {record.doc_id!r}, {len(fresh)} expected: nothing was "
                    "switched; rerun `dualtrack kb migrate`"
                )
            expected += got
        total = self.store.count_chunks(into=target)
        if total != expected:
            raise RelayoutError(
                f"{target!r} holds {total} chunks, its documents {expected}: nothing was switched; rerun "
                "`dualtrack kb migrate`"
            )

    def _switch(self, live: str, target: str) -> str:
        if live == self.name:  # a plain collection: renamed, then the alias takes its name
            kept = f"{self.name}{GENERATION}0"
            if self.store.exists(self.client, kept):
                raise RelayoutError(
                    f"{kept!r} already exists (an earlier rebuild's original); drop or rename it first"
                )
            self.client.rename_collection(self.name, kept)
            self.client.create_alias(target, self.name)
        else:
            kept = live
            self.client.alter_alias(target, self.name)
        self.client.release_collection(kept)
        return kept

    # -- 3. relabel --------------------------------------------------------------------------

    def _relabel(self) -> int:
        records = list(self.store.iter_documents())
        done = 0
        for i, record in enumerate(records, 1):
            want = self.ingestor.version_now(record)
            if record.version != want and record.doc_id not in self.foreign:
                done += self._relabel_one(record, want)
            self.progress("relabel", i, len(records))
        return done

    def _relabel_one(self, record: DocumentRecord, want: str) -> int:
        old = self.store.chunks_of(record.doc_id, record.version)
        fresh = self.ingestor.layout(record, recovered_blocks(old), want)
        same = [(c.text, c.metadata.get("section")) for c in fresh] == [
            (c.text, c.metadata.get("section")) for c in old
        ]
        if same:
            vectors = self.store.vectors_of(record.doc_id, record.version)
        else:
            vectors = self.embedder.embed_passages([embedding_text(c) for c in fresh])
            self.reembedded += 1
        self.store.write_chunks(fresh, vectors, batch=self.settings.ingest.insert_batch)
        now = self.store.get_document(record.doc_id)
        if now is None or now.version != record.version:  # a writer replaced it meanwhile: theirs stands
            self.store.delete_chunks([c.id for c in fresh])
            return 0
        self.store.activate(replace(record, version=want, chunks=len(fresh)))
        self.store.purge_stale(record.doc_id, want)
        return 1

    # -- helpers -----------------------------------------------------------------------------

    def _layout(self, record: DocumentRecord) -> list[Chunk]:
        """The document's chunks as the new collection holds them, under its current version."""
        old = self.store.chunks_of(record.doc_id, record.version)
        if record.doc_id in self.foreign:
            return old
        return self.ingestor.layout(record, recovered_blocks(old), record.version)

    def _foreign(self) -> set[str]:
        ledger = schema.ledger_name(self.name)
        if not self.store.exists(self.client, ledger):
            return set()
        self.client.load_collection(ledger)
        mine = self.settings.sync.origin
        out: set[str] = set()
        iterator = self.client.query_iterator(
            ledger, batch_size=4096, filter="", output_fields=[schema.DOC_ID, schema.ORIGIN, schema.DELETED]
        )
        try:
            while page := iterator.next():
                out |= {r[schema.DOC_ID] for r in page if r[schema.ORIGIN] != mine and not r[schema.DELETED]}
        finally:
            iterator.close()
        return out

    def _write(self, chunks: list[Chunk], into: str) -> None:
        vectors = self.embedder.embed_passages([embedding_text(c) for c in chunks])
        self.reembedded += 1
        self.store.write_chunks(chunks, vectors, batch=self.settings.ingest.insert_batch, into=into)

    def _delete(self, name: str, expr: str) -> None:
        self.client.delete(name, filter=expr)

    def _has_sparse(self, name: str) -> bool:
        return schema.SPARSE in {f["name"] for f in self.client.describe_collection(name)["fields"]}


def relayout(settings: Settings, embedder: Embedder, progress: Progress | None = None) -> Relaid:
    """Bring every document of ``settings.milvus.collection`` to the current layout (see the
    module's docstring), serving throughout."""
    job = _Relayout(settings, embedder, progress)
    try:
        return job.run()
    finally:
        job.store.close()
