"""Ingest one document: parse, classify, chunk, embed, store -- atomically.

A changed document replaces its previous version without a moment where search
sees a mix of both, and a crash at any point leaves the previous version whole
(the write protocol is in ``services.kb.store``). An unchanged document is
skipped without embedding anything. Problems with the *document* come back as
a ``rejected`` result naming the reason; problems with the *store* raise
``StoreUnavailable`` because retrying later is the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol

import numpy as np

from services.config import Settings
from services.kb.access import Acl, AclError, acls_from_rules, combine
from services.kb.chunker import chunk_blocks
from services.kb.classification import Classification, labels_from_rules, most_restrictive
from services.kb.embedder import Embedder
from services.kb.errors import DocumentRejected
from services.kb.models import Block, Chunk, ChunkDraft
from services.kb.sandbox import parse_isolated
from services.kb.schema import MAX_DOC_ID, MAX_SOURCE
from services.kb.sidecar import read_sidecar
from services.kb.store import DocumentRecord, KnowledgeStore
from services.kb.tokens import embedding_head, embedding_input

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Bumped when chunk layout changes so every document is re-ingested once."""

_DOC_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Status = Literal["ingested", "skipped", "rejected", "refused"]
"""``rejected``: the document cannot be stored; ``refused``: the writer may not store it."""


class WriteRefused(Exception):
    """Raised by an ingest's ``authorize`` check: this writer may not write this document."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Authorize = Callable[["DocumentRecord | None", "DocumentRecord | None"], None]
"""Checks the stored version a write would replace (``new`` None: called before the document is
even parsed), then the prepared document, before anything is written."""


@dataclass
class IngestResult:
    """What happened to one document, for progress bars and API responses."""

    name: str
    status: Status
    doc_id: str | None = None
    chunks: int = 0
    version: str | None = None
    classification: Classification | None = None
    acl: Acl | None = None
    reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def doc_id_for(source: str) -> str:
    """A readable, URL-safe id from a relative path: ``policies/travel.pdf`` ->
    ``policies--travel.pdf``. When the slug had to change characters (``Travel Policy.pdf``),
    a short hash of the source is appended so ``a b.md`` and ``a-b.md`` stay apart."""
    parts = [p for p in PurePosixPath(source.replace("\\", "/")).parts if p not in ("", ".", "/")]
    slugs = [re.sub(r"[^a-z0-9._]+", "-", p.lower()).strip("-._") for p in parts]
    slug = "--".join(s for s in slugs if s) or "document"
    lossy = slugs != parts
    if lossy or len(slug) > MAX_DOC_ID:
        slug = slug[: MAX_DOC_ID - 9] + "-" + hashlib.sha256(source.encode()).hexdigest()[:8]
    return slug


def validate_doc_id(doc_id: str) -> str:
    if not (_DOC_ID.match(doc_id) and len(doc_id) <= MAX_DOC_ID):
        raise ValueError(
            f"doc_id {doc_id!r} must be 1-{MAX_DOC_ID} characters of letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return doc_id


def chunk_id(doc_id: str, version: str, chunk_no: int) -> str:
    """Deterministic: the same document content and settings give the same ids."""
    return hashlib.sha256(f"{doc_id}\x00{version}\x00{chunk_no}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class PreparedDocument:
    """A parsed, classified, chunked document, not yet embedded or stored."""

    record: DocumentRecord
    chunks: list[Chunk]
    timings: dict[str, float]


class ChangeListener(Protocol):
    """Told about each local write once it has succeeded (the sync publisher)."""

    def document_written(
        self, record: DocumentRecord, chunks: Sequence[Chunk], vectors: np.ndarray
    ) -> None: ...

    def document_deleted(self, doc_id: str) -> None: ...


class Ingestor:
    """Turns documents into searchable chunks in one ``KnowledgeStore``."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        store: KnowledgeStore,
        listener: ChangeListener | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = store
        self.listener = listener
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @contextmanager
    def _doc_lock(self, doc_id: str) -> Iterator[None]:
        """Serialise writers of one document inside this process (the gateway is
        multi-threaded); different documents proceed in parallel."""
        with self._locks_guard:
            lock = self._locks.setdefault(doc_id, threading.Lock())
        with lock:
            yield

    def ingest_path(self, path: Path, root: Path | None = None, **kwargs: Any) -> IngestResult:
        """Ingest a file from disk, honouring its sidecar."""
        source = path.relative_to(root).as_posix() if root else path.name
        try:
            sidecar = read_sidecar(path)
            data = path.read_bytes()
        except (OSError, ValueError) as exc:
            return IngestResult(name=source, status="rejected", reason=str(exc))
        metadata = {**sidecar.metadata, **(kwargs.pop("metadata", None) or {})}
        return self.ingest_bytes(
            data,
            source,
            doc_id=kwargs.pop("doc_id", None) or sidecar.doc_id,
            labels=[sidecar.classification, kwargs.pop("classification", None)],
            acls=[sidecar.acl, kwargs.pop("acl", None)],
            title=sidecar.title,
            metadata=metadata,
        )

    def ingest_bytes(
        self,
        data: bytes,
        source: str,
        *,
        doc_id: str | None = None,
        labels: list[Classification | None] | None = None,
        acls: list[Acl | None] | None = None,
        default_acl: Acl | None = None,
        title: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        authorize: Authorize | None = None,
    ) -> IngestResult:
        """Ingest ``data`` named ``source`` (a relative path or upload filename).

        ``labels`` are operator-given classifications (flag, sidecar); the stored label is the
        most restrictive of those, the document's own, the path rules and the label the stored
        version already has: a label only goes up on re-ingest (lowering one is
        :meth:`set_access`). ``acls`` likewise: the stored ACL is what all of them and the
        stored version's allow, so a re-ingest can narrow who may read, never widen it.
        ``authorize`` is asked first about the stored version alone (so that nothing of it shows
        in a refusal), then again with the outcome known, before anything is written.
        """
        upload = Upload(
            data,
            source,
            doc_id=doc_id,
            labels=labels,
            acls=acls,
            title=title,
            metadata=metadata,
            default_acl=default_acl,
            authorize=authorize,
        )
        return self.ingest_many([upload])[0]

    def ingest_many(self, uploads: Sequence[Upload]) -> list[IngestResult]:
        """``ingest_bytes`` for several documents, their writes batched: one registry read for
        all, one embedding call, then the chunks of every changed document, one registry upsert
        flipping them all, one delete of what they replace. Each document is still atomic (its
        chunks are written before its registry row names them; its old rows go only after),
        and a rejected document does not stop the others. A document named twice is ingested
        by the second entry after the first."""
        seen: set[str] = set()
        rounds: list[list[int]] = [[]]
        for i, u in enumerate(uploads):
            target = u.doc_id or doc_id_for(u.source)
            if target in seen:  # the same document again: in a later round, after this one
                seen, rounds = set(), [*rounds, []]
            seen.add(target)
            rounds[-1].append(i)
        results: list[IngestResult | None] = [None] * len(uploads)
        for indices in rounds:
            for i, r in zip(indices, self._ingest_round([uploads[i] for i in indices]), strict=True):
                results[i] = r
        return [r for r in results if r is not None]

    def _ingest_round(self, uploads: Sequence[Upload]) -> list[IngestResult]:
        targets = [u.doc_id or doc_id_for(u.source) for u in uploads]
        with contextlib.ExitStack() as held:
            for target in sorted(set(targets)):
                held.enter_context(self._doc_lock(target))
            valid = [t for t in targets if _DOC_ID.match(t)]
            current = self.store.get_documents(valid)
            results: list[IngestResult] = []
            writes: list[tuple[int, PreparedDocument]] = []
            for u, target in zip(uploads, targets, strict=True):
                now = current.get(target)
                refused = _refusal(u, None, now, target)  # before anything of the stored version shows
                prepared = refused or self.prepare(
                    u.data,
                    u.source,
                    doc_id=u.doc_id,
                    labels=[*(u.labels or []), now.classification if now else None],
                    acls=[*(u.acls or []), now.acl if now else None],
                    default_acl=u.default_acl,
                    title=u.title,
                    metadata=u.metadata,
                )
                if not isinstance(prepared, IngestResult):
                    prepared = _refusal(u, prepared.record, now, prepared.record.doc_id) or prepared
                results.append(
                    prepared if isinstance(prepared, IngestResult) else _pending(u.source, prepared)
                )
                if not isinstance(prepared, IngestResult):
                    writes.append((len(results) - 1, prepared))
            stored = self.store.version_counts(
                [p.record.doc_id for _, p in writes if p.record.doc_id in current]
            )
            changed: list[tuple[int, PreparedDocument]] = []
            for i, p in writes:
                r, now = p.record, current.get(p.record.doc_id)
                if (
                    now is not None
                    and now.version == r.version
                    and stored.get((r.doc_id, r.version)) == now.chunks
                ):
                    if sum(n for (d, _), n in stored.items() if d == r.doc_id) > now.chunks:
                        self.store.purge_stale(r.doc_id, r.version)  # leftovers of an interrupted run
                    results[i] = replace(results[i], status="skipped", chunks=now.chunks, reason="unchanged")
                else:
                    changed.append((i, p))
            if changed:
                self._write_many(changed, results)
        return results

    def _write_many(self, changed: list[tuple[int, PreparedDocument]], results: list[IngestResult]) -> None:
        chunks = [c for _, p in changed for c in p.chunks]
        started = time.perf_counter()
        vectors = self.embedder.embed_passages([embedding_text(c) for c in chunks])
        embed = time.perf_counter() - started
        started = time.perf_counter()
        records = [replace(p.record, ingested_at=time.time()) for _, p in changed]
        self.store.write_chunks(chunks, vectors, batch=self.settings.ingest.insert_batch)
        self.store.activate(*records)
        self.store.purge_stale_many({r.doc_id: r.version for r in records})
        insert = time.perf_counter() - started
        offset = 0
        for (i, p), record in zip(changed, records, strict=True):
            share = len(p.chunks) / max(len(chunks), 1)  # the batch's time, by each one's chunks
            results[i].timings.update(embed=embed * share, insert=insert * share)
            results[i] = replace(results[i], status="ingested")
            self._tell("document_written", record, p.chunks, vectors[offset : offset + len(p.chunks)])
            offset += len(p.chunks)

    def prepare(
        self,
        data: bytes,
        source: str,
        *,
        doc_id: str | None = None,
        labels: list[Classification | None] | None = None,
        acls: list[Acl | None] | None = None,
        default_acl: Acl | None = None,
        title: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> PreparedDocument | IngestResult:
        """Parse, classify and chunk without touching the store (nor embedding): the
        document as it would be written, or a ``rejected`` result saying why not."""
        timings: dict[str, float] = {}
        limit = self.settings.ingest.max_file_bytes
        if len(source.encode()) > MAX_SOURCE:
            return _rejected(source[:200], f"source name longer than {MAX_SOURCE} bytes (UTF-8)")
        if len(data) > limit:
            return _rejected(
                source, f"file is {len(data)} bytes, over the limit of {limit} (ingest.max_file_bytes)"
            )
        try:
            doc_id = validate_doc_id(doc_id or doc_id_for(source))
        except ValueError as exc:
            return _rejected(source, str(exc))

        started = time.perf_counter()
        try:
            doc = parse_isolated(data, source, self.settings.ingest.parser_limits())
        except DocumentRejected as exc:
            return _rejected(source, exc.reason, doc_id)
        timings["parse"] = time.perf_counter() - started

        rules = self.settings.classification.rules()
        label = most_restrictive(
            [*(labels or []), doc.declared, *labels_from_rules(source, rules)],
            self.settings.classification.default,
        )
        try:
            acl = combine(
                [*(acls or []), doc.declared_acl, *acls_from_rules(source, self.settings.access.rules())],
                default_acl or self.settings.access.default(),
                source,
            )
        except AclError as exc:
            return _rejected(source, str(exc), doc_id)
        doc_title = title or doc.title or PurePosixPath(source).stem
        meta = {**doc.metadata, **dict(metadata or {})}
        try:  # before chunking: the tokenizer, too, refuses a lone surrogate
            json.dumps([meta, title, doc.title, doc_title], ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a ValueError too: caught first
            return _rejected(source, "the title or metadata is not valid Unicode (a lone surrogate)", doc_id)
        except (TypeError, ValueError):
            return _rejected(source, "metadata must be JSON-serialisable", doc_id)
        started = time.perf_counter()
        drafts = chunk_blocks(
            doc.blocks, self.settings.chunking, self.embedder.window, lambda s: embedding_head(doc_title, s)
        )
        timings["chunk"] = time.perf_counter() - started
        cap = self.settings.ingest.max_chunks_per_document
        if len(drafts) > cap:
            return _rejected(
                source,
                f"document yields {len(drafts)} chunks, over the limit of {cap} "
                "(ingest.max_chunks_per_document); split it or raise the limit",
                doc_id,
            )
        content_hash = hashlib.sha256(data).hexdigest()
        version = self._version(content_hash, label, acl, doc_title, meta)
        chunks = [
            self._chunk(doc_id, version, n, d, label, acl, source, doc_title, meta)
            for n, d in enumerate(drafts)
        ]
        record = DocumentRecord(
            doc_id=doc_id,
            version=version,
            content_hash=content_hash,
            classification=label,
            source=source,
            title=doc_title,
            chunks=len(chunks),
            ingested_at=time.time(),
            metadata=meta,
            acl=acl,
        )
        return PreparedDocument(record=record, chunks=chunks, timings=timings)

    def set_access(
        self, doc_id: str, classification: Classification | None = None, acl: Acl | None = None
    ) -> tuple[DocumentRecord, DocumentRecord] | None:
        """Set a stored document's label and/or access list exactly, lower or wider included:
        the admin action (callers audit it). The chunks are rewritten as a new version with the
        same text and vectors, by the same protocol as an ingest, so readers never see a mix.
        ``(before, after)``, or ``None`` when there is no such document. A later re-ingest
        still applies every source's label: a lowered label sticks only if its sources agree."""
        with self._doc_lock(doc_id):
            current = self.store.get_document(doc_id)
            if current is None:
                return None
            label = classification or current.classification
            access = acl or current.acl
            if label == current.classification and access == current.acl:
                return current, current
            basis = json.dumps([current.version, label.value, access.stored()])
            version = hashlib.sha256(basis.encode()).hexdigest()[:32]
            chunks = [
                replace(
                    c,
                    id=chunk_id(doc_id, version, c.chunk_no),
                    version=version,
                    classification=label,
                    acl=access,
                )
                for c in self.store.chunks_of(doc_id, current.version)
            ]
            vectors = self.store.vectors_of(doc_id, current.version)
            record = replace(
                current, version=version, classification=label, acl=access, ingested_at=time.time()
            )
            self.store.write_chunks(chunks, vectors, batch=self.settings.ingest.insert_batch)
            self.store.activate(record)
            self.store.purge_stale(doc_id, version)
            self._tell("document_written", record, chunks, vectors)
            return current, record

    def version_now(self, record: DocumentRecord) -> str:
        """The version an ingest with this configuration gives the stored document ``record``."""
        return self._version(
            record.content_hash, record.classification, record.acl, record.title, record.metadata
        )

    def layout(self, record: DocumentRecord, blocks: Sequence[Block], version: str) -> list[Chunk]:
        """The stored document ``record``, whose text is ``blocks``, chunked as an ingest with
        this configuration chunks it, under ``version`` (a migration's re-layout)."""
        drafts = chunk_blocks(
            blocks, self.settings.chunking, self.embedder.window, lambda s: embedding_head(record.title, s)
        )
        return [
            self._chunk(
                record.doc_id,
                version,
                n,
                d,
                record.classification,
                record.acl,
                record.source,
                record.title,
                record.metadata,
            )
            for n, d in enumerate(drafts)
        ]

    def delete(self, doc_id: str) -> bool:
        with self._doc_lock(doc_id):
            existed = self.store.delete_document(doc_id)
            if existed:
                self._tell("document_deleted", doc_id)
            return existed

    def _tell(self, what: str, *args: Any) -> None:
        """The local write has succeeded: a listener failure is logged, never the request's."""
        if self.listener is None:
            return
        try:
            getattr(self.listener, what)(*args)
        except Exception:
            log.exception(
                "%s: the change listener failed; the local write stands "
                "(publish it later with `dualtrack sync publish-existing`)",
                what,
            )

    def _version(
        self, content_hash: str, label: Classification, acl: Acl, title: str, meta: Mapping[str, Any]
    ) -> str:
        """Everything that changes stored rows goes into the version, so a new
        label, title, metadata, chunking or model re-ingests the document."""
        basis = json.dumps(
            [
                SCHEMA_VERSION,
                content_hash,
                label.value,
                acl.stored(),
                title,
                meta,
                self.settings.chunking.model_dump(),
                self.embedder.model_id,
                self.embedder.window.window,
            ],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(basis.encode()).hexdigest()[:32]

    @staticmethod
    def _chunk(
        doc_id: str,
        version: str,
        n: int,
        draft: ChunkDraft,
        label: Classification,
        acl: Acl,
        source: str,
        title: str,
        meta: Mapping[str, Any],
    ) -> Chunk:
        return Chunk(
            id=chunk_id(doc_id, version, n),
            doc_id=doc_id,
            version=version,
            chunk_no=n,
            text=draft.text,
            classification=label,
            source=source,
            page=draft.page or 0,
            acl=acl,
            metadata={
                **meta,
                "title": title,
                "section": draft.section,
                "sections": list(draft.sections),
                "page_end": draft.page_end or draft.page or 0,
            },
        )


@dataclass(frozen=True)
class Upload:
    """One document for ``Ingestor.ingest_many``: the arguments of ``Ingestor.ingest_bytes``."""

    data: bytes
    source: str
    doc_id: str | None = None
    labels: list[Classification | None] | None = None
    acls: list[Acl | None] | None = None
    title: str | None = None
    metadata: Mapping[str, Any] | None = None
    default_acl: Acl | None = None
    authorize: Authorize | None = None


def _refusal(
    upload: Upload, new: DocumentRecord | None, current: DocumentRecord | None, doc_id: str
) -> IngestResult | None:
    """The upload's ``authorize`` check as a result: None when it may write (or has no check).
    Before parsing (``new`` is None) there is only a stored version to check."""
    if upload.authorize is None or (new is None and current is None):
        return None
    try:
        upload.authorize(new, current)
    except WriteRefused as exc:
        return IngestResult(name=upload.source, status="refused", doc_id=doc_id, reason=exc.reason)
    return None


def _pending(name: str, prepared: PreparedDocument) -> IngestResult:
    r = prepared.record
    return IngestResult(
        name=name,
        status="ingested",
        doc_id=r.doc_id,
        chunks=len(prepared.chunks),
        version=r.version,
        classification=r.classification,
        acl=r.acl,
        timings=prepared.timings,
    )


def embedding_text(chunk: Chunk) -> str:
    """What the model sees: the title and section give short chunks their context.
    Shared with the sync consumer, which re-embeds received chunks the same way."""
    return embedding_input(
        embedding_head(str(chunk.metadata.get("title") or ""), chunk.metadata.get("section")), chunk.text
    )


def _rejected(name: str, reason: str, doc_id: str | None = None) -> IngestResult:
    return IngestResult(name=name, status="rejected", doc_id=doc_id, reason=reason)
