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

Every step is resumable: a rerun skips what is done, and one stopped between the rename and
the alias finishes the switch. Writers (the gateway, the sync consumer) may run throughout:
what they write into the old collection around the switch is carried over after it, and a
document they change during the relabel step keeps their version (the registry row is compared
whole just before the flip; Milvus has no compare-and-set, so a change landing in that same
instant can still be overtaken, as between any two writing processes).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from services.config import Settings
from services.kb import schema
from services.kb.embedder import Embedder
from services.kb.errors import KBError
from services.kb.filters import literal
from services.kb.ingest import Ingestor, embedding_text
from services.kb.models import Block, Chunk
from services.kb.store import MILVUS_ERRORS, DocumentRecord, KnowledgeStore, milvus_message

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
    predecessor's tail removed, as blocks carrying each chunk's page and first section. What
    is removed is text the previous chunk already holds, so nothing is lost; an overlap
    shorter than ``MIN_OVERLAP`` stays (repeated once)."""
    blocks: list[Block] = []
    previous = ""
    for c in sorted(chunks, key=lambda c: c.chunk_no):
        text = c.text[_overlap(previous, c.text) :].strip()
        if text:
            blocks.append(Block(text, page=c.page or None, section=c.metadata.get("section")))
        previous = c.text
    return blocks


def _overlap(previous: str, text: str) -> int:
    """The shortest start of ``text`` (whole words, at least ``MIN_OVERLAP`` characters, never
    all of it) that ``previous`` ends with, also at a word boundary; 0 if none. The shortest,
    so that text repeating itself (a refrain, a table of equal rows) loses nothing: at worst a
    repeated sentence survives twice."""
    for m in re.finditer(r"\s", text):
        k = m.start()
        if k > len(previous):
            break
        if (
            k >= MIN_OVERLAP
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
        self.fresh: set[tuple[str, str]] = set()
        """(document, version) embedded by this run with the current model: the only vectors the
        relabel step may reuse (after a model change every document is embedded again)."""
        self.foreign: set[str] = set()
        """Documents another site published (the sync ledger names their origin): their chunks
        and versions are their origin's, so they are carried over as they are, never relabelled."""

    @property
    def client(self) -> MilvusClient:
        return self.store.client

    def run(self) -> Relaid:
        try:
            return self._run()
        except MILVUS_ERRORS as exc:
            raise RelayoutError(
                f"the rebuild stopped at Milvus {self.store.where}: {milvus_message(exc)}; what is served is "
                "intact: rerun `dualtrack kb migrate` to go on"
            ) from None

    def _run(self) -> Relaid:
        self._finish_switch()
        self.store.connect()  # validates; an old collection is served dense meanwhile
        self.foreign = self._foreign()
        before = self.store.count_chunks()
        built = kept = None
        if self.settings.milvus.full_text and not self._has_sparse(self.name):
            built, kept = self._build()
            self.store.full_text, self.store.pending = True, None
            self._carry_over(kept)  # what writers put into the old collection around the switch
        relabelled = self._relabel()
        if kept:
            self._carry_over(kept)  # and an ingest that straddled the switch
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

    def _finish_switch(self) -> None:
        """A run stopped between renaming the old collection and creating the alias: the name
        is missing, its ``__g0`` and a verified successor are there. Finish the switch (or,
        stopped before anything was built, undo the rename)."""
        milvus = self.settings.milvus
        token = milvus.token.get_secret_value() if milvus.token else ""
        client = MilvusClient(uri=milvus.uri, token=token, timeout=milvus.timeout_s)
        try:
            names = client.list_collections()
            first = schema.generation_name(self.name, 0)
            if first not in names or client.has_collection(self.name):
                return
            built = [n for n in self._numbers(names) if n > 0]
            if built:
                client.create_alias(schema.generation_name(self.name, max(built)), self.name)
            else:
                client.rename_collection(first, self.name)
        finally:
            client.close()

    def _numbers(self, names: Sequence[str]) -> list[int]:
        prefix = schema.generation_name(self.name, 0)[:-1]
        return [int(n[len(prefix) :]) for n in names if re.fullmatch(re.escape(prefix) + r"\d+", n)]

    def _served(self) -> str:
        """The collection behind the served name: the alias's target, or the name itself."""
        try:
            return str(self.client.describe_alias(self.name)["collection_name"])
        except MilvusException:
            return self.name

    def _target(self, live: str) -> str:
        numbers = self._numbers(self.client.list_collections())
        current = self._numbers([live])[0] if live != self.name else 0
        pending = [n for n in numbers if n > current]  # a build that was interrupted: resumed
        return schema.generation_name(self.name, max(pending) if pending else max([current, *numbers]) + 1)

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
                self._copy(record, fresh, None, target)
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
            want = len(self._layout(record))
            got = self.store.count_chunks(record.doc_id, record.version, into=target)
            if got != want:
                raise RelayoutError(
                    f"{target!r} holds {got} chunks of {record.doc_id!r}, {want} expected: nothing was "
                    "switched; rerun `dualtrack kb migrate`"
                )
            expected += got
        total = self.store.count_chunks(into=target)
        if total != expected:
            raise RelayoutError(
                f"{target!r} holds {total} chunks, its documents {expected}: nothing was switched; rerun "
                "`dualtrack kb migrate`"
            )

    # -- 2. switch ---------------------------------------------------------------------------

    def _switch(self, live: str, target: str) -> str:
        if live == self.name:  # a plain collection: renamed, then the alias takes its name
            kept = schema.generation_name(self.name, 0)
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

    def _carry_over(self, old: str) -> None:
        """Documents whose registry version has no chunks in the served collection but has them
        in ``old``: written by a writer after the last catch-up pass, or across the switch.
        Rebuilt from there into the served collection."""
        self.client.load_collection(old)
        try:
            for record in self.store.iter_documents():
                if self.store.count_chunks(record.doc_id, record.version):
                    continue
                old_chunks = self.store.chunks_of(record.doc_id, record.version, into=old)
                if old_chunks:
                    self._copy(record, self._layout(record, old_chunks), old, None)
        finally:
            self.client.release_collection(old)

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
        if same and (record.doc_id, record.version) in self.fresh:
            vectors = self.store.vectors_of(record.doc_id, record.version)
        else:
            vectors = self._embed(fresh)
        self.store.write_chunks(fresh, vectors, batch=self.settings.ingest.insert_batch)
        if self.store.get_document(record.doc_id) != record:
            # a writer changed it meanwhile (content, label or access list): theirs stands
            self.store.delete_chunks([c.id for c in fresh])
            return 0
        self.store.activate(replace(record, version=want, chunks=len(fresh)))
        if self.store.count_chunks(record.doc_id, want) != len(fresh):
            self._yield_to_writer(record)  # a writer flipped in the instant after the check
            return 0
        # only the relabelled version goes: a writer's newer one, had it raced in, stays
        self._delete(
            self.name,
            f"{schema.DOC_ID} == {literal(record.doc_id)} and {schema.VERSION} == {literal(record.version)}",
        )
        return 1

    def _yield_to_writer(self, record: DocumentRecord) -> None:
        """A writer's version landed between the check and the flip: its purge took the
        relabelled rows and the flip overwrote its registry row. The registry is pointed back
        at the writer's version, described by its own chunks (their label, access list, title
        and metadata are the writer's), so nobody reads it under the older, wider terms."""
        counts = {
            v: n for (d, v), n in self.store.version_counts([record.doc_id]).items() if d == record.doc_id
        }
        if not counts:
            return
        version = max(counts, key=lambda v: counts[v])
        chunk = self.store.chunks_of(record.doc_id, version)[0]
        meta = {
            k: v for k, v in chunk.metadata.items() if k not in {"title", "section", "sections", "page_end"}
        }
        self.store.activate(
            replace(
                record,
                version=version,
                chunks=counts[version],
                classification=chunk.classification,
                acl=chunk.acl,
                source=chunk.source,
                title=str(chunk.metadata.get("title") or record.title),
                metadata=meta,
                ingested_at=time.time(),
            )
        )

    # -- helpers -----------------------------------------------------------------------------

    def _layout(self, record: DocumentRecord, chunks: list[Chunk] | None = None) -> list[Chunk]:
        """The document's chunks as a rebuilt collection holds them, under its current version:
        re-chunked from ``chunks`` (default: the served ones), or those as they are for a
        document another site published."""
        old = chunks if chunks is not None else self.store.chunks_of(record.doc_id, record.version)
        if record.doc_id in self.foreign:
            return old
        return self.ingestor.layout(record, recovered_blocks(old), record.version)

    def _copy(
        self, record: DocumentRecord, chunks: list[Chunk], source: str | None, into: str | None
    ) -> None:
        """Write ``chunks`` into ``into``: a foreign document's with the vectors it came with
        (read from ``source``), anyone else's embedded now."""
        if record.doc_id in self.foreign:
            vectors = self.store.vectors_of(record.doc_id, record.version, into=source)
        else:
            vectors = self._embed(chunks)
            self.fresh.add((record.doc_id, record.version))
        self.store.write_chunks(chunks, vectors, batch=self.settings.ingest.insert_batch, into=into)

    def _embed(self, chunks: list[Chunk]) -> np.ndarray:
        self.reembedded += 1
        return self.embedder.embed_passages([embedding_text(c) for c in chunks])

    def _delete(self, name: str, expr: str) -> None:
        self.client.delete(name, filter=expr)

    def _has_sparse(self, name: str) -> bool:
        return schema.SPARSE in {f["name"] for f in self.client.describe_collection(name)["fields"]}

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


def relayout(settings: Settings, embedder: Embedder, progress: Progress | None = None) -> Relaid:
    """Bring every document of ``settings.milvus.collection`` to the current layout (see the
    module's docstring), serving throughout."""
    job = _Relayout(settings, embedder, progress)
    try:
        return job.run()
    finally:
        job.store.close()
