"""The document endpoints: upload (one file, or a batch), list, read, change access, delete.

Every write goes through ``Ingestor`` with an ``authorize`` check built from the caller's
principal, so what a contributor may replace or share is decided in one place
(``may_write``) for single and batched uploads alike.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from services.auth.principal import Principal, Role
from services.config import Settings
from services.gateway import schemas
from services.gateway.audit import audit_of, passages
from services.gateway.auth import principal_of
from services.gateway.metrics import Metrics
from services.kb.access import Acl, AclError
from services.kb.classification import Classification, parse_label
from services.kb.ingest import IngestResult, Upload, WriteRefused, validate_doc_id
from services.kb.loaders import CONTENT_TYPES, suffix_of
from services.kb.models import Hit
from services.kb.schema import SYNCED_FROM
from services.kb.service import KnowledgeBase
from services.kb.store import DocumentRecord


def document_routes(
    settings: Settings,
    knowledge: KnowledgeBase,
    metrics: Metrics,
    secured: Sequence[Any],
    writes: Sequence[Any],
    admin_only: Sequence[Any],
    url: Callable[..., str],
) -> APIRouter:
    router = APIRouter(tags=["documents"])
    max_upload = settings.ingest.max_file_bytes

    @router.post(
        "/v1/documents",
        dependencies=writes,
        response_model=schemas.IngestResponse,
        status_code=201,
        responses={200: {"description": "unchanged: skipped"}, 413: {}, 415: {}, 422: {}},
        summary="Upload a document (.txt .md .html .pdf .docx)",
    )
    def upload(
        file: Annotated[UploadFile, File(description="the document")],
        classification: Annotated[str | None, Form(description="public | internal | confidential")] = None,
        doc_id: Annotated[str | None, Form()] = None,
        source: Annotated[str | None, Form(description="path used for rules and citations")] = None,
        metadata: Annotated[str | None, Form(description="JSON object of scalar values")] = None,
        title: Annotated[str | None, Form(max_length=200)] = None,
        groups: Annotated[
            list[str] | None, Form(description='who may read it (repeat the field); "*" is everyone')
        ] = None,
        users: Annotated[
            list[str] | None, Form(description="users who may read it (repeat the field)")
        ] = None,
        *,
        request: Request,
    ) -> JSONResponse:
        item = schemas.BatchItem.model_construct(  # checked below, as the fields of one upload
            source=source,
            doc_id=doc_id,
            classification=classification,
            title=title,
            groups=groups,
            users=users,
        )
        upload = _upload(file, item, _metadata(metadata), principal_of(request), max_upload)
        (result,) = knowledge.ingestor.ingest_many([upload])
        _record([result])
        audit_of(request).detail = _outcome(result)
        code = {"ingested": 201, "skipped": 200, "rejected": 422, "refused": 403}[result.status]
        return JSONResponse(_ingest_body(result).model_dump(mode="json"), status_code=code)

    @router.post(
        "/v1/documents/batch",
        dependencies=writes,
        response_model=schemas.BatchIngestResponse,
        responses={413: {}, 422: {}},
        summary="Upload several documents in one request; their writes are batched",
    )
    def upload_batch(
        files: Annotated[list[UploadFile], File(description="the documents, in order")],
        items: Annotated[
            str | None,
            Form(
                description="JSON array with one object per file, in the same order: source, doc_id, "
                "classification, title, metadata, groups, users (all optional)"
            ),
        ] = None,
        *,
        request: Request,
    ) -> schemas.BatchIngestResponse:
        """Each file is checked, authorized and ingested on its own, as by ``POST /v1/documents``;
        what is batched are the store's writes (one registry read, one embedding call, one
        insert of all chunks, one registry flip). The bytes of all files together stay within
        ``ingest.max_file_bytes``."""
        limit = settings.ingest.max_batch_documents
        if len(files) > limit:
            raise HTTPException(
                413,
                f"a batch carries {len(files)} files, over the limit of {limit} (ingest.max_batch_documents)",
            )
        total = sum(f.size or 0 for f in files)
        if total > max_upload:
            raise HTTPException(
                413,
                f"the batch's files are {total} bytes together, over the limit of {max_upload} "
                "(ingest.max_file_bytes): send fewer files per request",
            )
        options = _items(items, len(files))
        principal = principal_of(request)
        results: list[IngestResult | None] = [None] * len(files)
        uploads, slots = [], []
        for i, (file, item) in enumerate(zip(files, options, strict=True)):
            try:
                if isinstance(item, HTTPException):
                    raise item
                meta = _finite(dict(item.metadata)) if item.metadata is not None else None
                uploads.append(_upload(file, item, meta, principal, max_upload))
                slots.append(i)
            except HTTPException as exc:  # this file only: the others go on
                given = item if isinstance(item, schemas.BatchItem) else schemas.BatchItem()
                results[i] = _refused_early(given.source or file.filename or "upload", given.doc_id, exc)
        for i, result in zip(slots, knowledge.ingestor.ingest_many(uploads), strict=True):
            results[i] = result
        done = [r for r in results if r is not None]
        _record(done)
        audit_of(request).detail = {"documents": [{"file": i, **_outcome(r)} for i, r in enumerate(done)]}
        return schemas.BatchIngestResponse(results=[_ingest_body(r) for r in done])

    def _record(results: Sequence[IngestResult]) -> None:
        for result in results:
            metrics.ingested_documents.labels(result.status).inc()
            if result.status == "ingested" and result.classification is not None:
                metrics.ingested_chunks.labels(result.classification.value).inc(result.chunks)

    def _upload(
        file: UploadFile,
        item: schemas.BatchItem,
        meta: dict[str, Any] | None,
        principal: Principal,
        room: int,
    ) -> Upload:
        """One file and its options as an ``Upload``, checked as far as can be before parsing;
        ``room``: the bytes it may have."""
        name = item.source or file.filename or "upload"
        if any(unicodedata.category(c) == "Cc" for c in name):
            raise HTTPException(
                422, f"source {name!r} contains control characters; name the file without them"
            )
        _check_content_type(name, file.content_type)
        label = _label(item.classification)
        try:
            acl = Acl.of(item.groups or (), item.users or (), "upload") if item.groups or item.users else None
        except AclError as exc:
            raise HTTPException(422, str(exc)) from None
        if item.doc_id is not None:
            try:
                validate_doc_id(item.doc_id)
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from None
        data = file.file.read(room + 1)
        if len(data) > room:
            raise HTTPException(
                413, f"{name}: upload is over the limit of {max_upload} bytes (ingest.max_file_bytes)"
            )
        return Upload(
            data=data,
            source=name,
            doc_id=item.doc_id,
            labels=[label],
            acls=[acl],
            title=item.title,
            metadata=meta,
            default_acl=None if principal.has(Role.ADMIN) else principal.own_acl(),
            authorize=lambda new, current: _may_write(principal, new, current),
        )

    @router.get(
        "/v1/documents",
        dependencies=secured,
        response_model=schemas.DocumentList,
        summary="List stored documents",
    )
    def list_documents(request: Request, limit: int = 1000, offset: int = 0) -> schemas.DocumentList:
        docs = knowledge.store.list_documents(
            limit=min(max(limit, 1), 16384),
            offset=max(offset, 0),
            reader=principal_of(request).reader(),
        )
        audit_of(request).detail = {"documents": len(docs)}
        return schemas.DocumentList(documents=[_doc_out(d) for d in docs])

    @router.get(
        "/v1/documents/{doc_id}",
        dependencies=secured,
        response_model=schemas.DocumentDetail,
        responses={404: {}},
        summary="A document's record and its chunks",
    )
    def get_document(doc_id: str, request: Request) -> schemas.DocumentDetail:
        _known_shape(doc_id)
        record = _readable(doc_id, principal_of(request))
        chunks = knowledge.store.chunks_of(doc_id, record.version)
        return schemas.DocumentDetail(
            **_doc_out(record).model_dump(),
            chunk_list=[
                schemas.ChunkSummary(
                    id=c.id,
                    chunk_no=c.chunk_no,
                    page=c.page or None,
                    section=c.sections,
                    words=len(c.text.split()),
                )
                for c in chunks
            ],
        )

    @router.get(
        "/v1/documents/{doc_id}/chunks/{chunk_id}",
        dependencies=secured,
        response_model=schemas.ChunkOut,
        responses={404: {}},
        summary="One chunk's text: what a citation points to",
    )
    def get_chunk(doc_id: str, chunk_id: str, request: Request) -> schemas.ChunkOut:
        _known_shape(doc_id)
        record = knowledge.store.get_document(doc_id)
        if record is not None and not principal_of(request).reader().may_read(
            record.classification, record.acl
        ):
            record = None  # not readable is not found: its existence is not disclosed
        chunk = (
            next((c for c in knowledge.store.chunks_of(doc_id, record.version) if c.id == chunk_id), None)
            if record is not None
            else None
        )
        if chunk is None:
            raise HTTPException(404, f"no chunk {chunk_id!r} in the current version of {doc_id!r}")
        audit_of(request).results = passages([Hit(chunk, 1.0)])
        return schemas.ChunkOut(
            id=chunk.id,
            doc_id=chunk.doc_id,
            chunk_no=chunk.chunk_no,
            title=chunk.metadata.get("title"),
            source=chunk.source,
            page=chunk.page or None,
            section=chunk.sections,
            classification=chunk.classification,
            text=chunk.text,
            document_url=url(doc_id, chunk.page or None),
        )

    @router.put(
        "/v1/documents/{doc_id}/access",
        dependencies=[*secured, *admin_only],
        response_model=schemas.AccessChanged,
        responses={404: {}},
        summary="Set a document's label and access list (admin; lowering is allowed and audited)",
    )
    def set_access(doc_id: str, body: schemas.AccessChange, request: Request) -> schemas.AccessChanged:
        _known_shape(doc_id)
        acl = None
        if body.groups is not None or body.users is not None:
            try:
                acl = Acl.of(body.groups or (), body.users or (), "access")
            except AclError as exc:
                raise HTTPException(422, str(exc)) from None
        changed = knowledge.ingestor.set_access(doc_id, body.classification, acl)
        if changed is None:
            raise HTTPException(404, f"no document {doc_id!r}")
        before, after = changed
        audit_of(request).detail = {
            "reason": body.reason,
            "before": {"classification": before.classification.value, "acl": before.acl.stored()},
            "after": {"classification": after.classification.value, "acl": after.acl.stored()},
            "lowered": after.classification.rank < before.classification.rank,
        }
        return schemas.AccessChanged(doc_id=doc_id, before=_doc_out(before), after=_doc_out(after))

    @router.delete(
        "/v1/documents/{doc_id}",
        dependencies=writes,
        status_code=204,
        responses={404: {}},
        summary="Delete a document and all its chunks",
    )
    def delete_document(doc_id: str, request: Request) -> Response:
        _known_shape(doc_id)
        principal = principal_of(request)
        record = _readable(doc_id, principal)
        if not principal.may_manage(record.acl):
            raise HTTPException(403, _unmanaged(principal, record))
        if not knowledge.ingestor.delete(doc_id):
            raise HTTPException(404, f"no document {doc_id!r}")
        return Response(status_code=204)

    # -- helpers -------------------------------------------------------------------------

    def _doc_out(d: Any) -> schemas.DocumentOut:
        return schemas.DocumentOut(
            doc_id=d.doc_id,
            title=d.title,
            source=d.source,
            classification=d.classification,
            version=d.version,
            content_hash=d.content_hash,
            chunks=d.chunks,
            ingested_at=d.ingested_at,
            metadata=d.metadata,
            access=schemas.Access.of(d.acl),
            url=url(d.doc_id),
        )

    def _readable(doc_id: str, principal: Principal) -> DocumentRecord:
        """The document's record if ``principal`` may read it; a 404 otherwise, the same as for
        a document that does not exist, so its existence is not disclosed."""
        record = knowledge.store.get_document(doc_id)
        if record is None or not principal.reader().may_read(record.classification, record.acl):
            raise HTTPException(404, f"no document {doc_id!r}")
        return record

    def _may_write(principal: Principal, new: DocumentRecord | None, current: DocumentRecord | None) -> None:
        if current is not None and not principal.reader().may_read(current.classification, current.acl):
            raise WriteRefused(
                f"doc_id {current.doc_id!r} belongs to a document you cannot read; choose another doc_id"
            )
        if current is not None and not principal.may_manage(current.acl):
            raise WriteRefused(_unmanaged(principal, current))
        if new is None:
            return
        added = Acl(new.acl.entries - current.acl.entries) if current is not None else new.acl
        if principal.has(Role.ADMIN):
            return
        groups = ", ".join(sorted(principal.groups)) or "no groups"
        if not added.within(principal.tokens()):
            raise WriteRefused(
                f"you may give access only to your own groups or yourself; the document's access "
                f"list would be [{new.acl}], and {principal.subject!r} is in: {groups}"
            )
        if not principal.may_manage(new.acl):  # narrowed past oneself: a hand-over is an admin's
            raise WriteRefused(
                f"the document's access list would be [{new.acl}], which leaves out {principal.subject!r} "
                f"(in: {groups}): you could no longer change it; an admin may hand it over "
                f"(PUT /v1/documents/{new.doc_id}/access)"
            )

    return router


def _unmanaged(principal: Principal, record: DocumentRecord) -> str:
    groups = ", ".join(sorted(principal.groups)) or "none"
    return (
        f"{record.doc_id!r} is shared with [{record.acl}]: a contributor may change documents shared "
        f"with one of its groups; {principal.subject!r} is in: {groups}"
    )


def _known_shape(doc_id: str) -> None:
    """An id no document can have is a plain 404, never a malformed Milvus expression."""
    try:
        validate_doc_id(doc_id)
    except ValueError:
        raise HTTPException(404, f"no document {doc_id!r}") from None


def _check_content_type(name: str, declared: str | None) -> None:
    suffix = suffix_of(name)
    allowed = CONTENT_TYPES.get(suffix)
    if allowed is None:
        raise HTTPException(
            415,
            f"{name}: unsupported file type {suffix or '(none)'!r}; "
            f"supported: {', '.join(sorted(CONTENT_TYPES))}",
        )
    ctype = (declared or "application/octet-stream").split(";")[0].strip().lower()
    if ctype not in (*allowed, "application/octet-stream"):
        raise HTTPException(
            415, f"{name}: content type {ctype!r} does not match {suffix}; expected {allowed[0]}"
        )


def _label(value: str | None) -> Classification | None:
    if value is None or not value.strip():
        return None
    try:
        return parse_label(value, "classification")
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def _metadata(value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        meta = json.loads(value, parse_constant=_no_constant)
    except ValueError as exc:
        raise HTTPException(422, f"metadata is not valid JSON: {exc}") from None
    return _metadata_of(meta)


def _metadata_of(meta: Any) -> dict[str, Any]:
    """Metadata as stored and filtered on: an object of strings, finite numbers and booleans."""
    if not isinstance(meta, dict):
        raise HTTPException(
            422, f"metadata must be a JSON object of strings, numbers and booleans, not {type(meta).__name__}"
        )
    if SYNCED_FROM in meta:
        raise HTTPException(
            422, f"metadata {SYNCED_FROM!r} is reserved: it names the site a synced document came from"
        )
    for key, v in meta.items():
        if not isinstance(v, str | int | float | bool):
            raise HTTPException(
                422,
                f"metadata {key!r} is {type(v).__name__ if v is not None else 'null'}: "
                "values must be strings, numbers or booleans",
            )
    return _finite(meta)


def _items(value: str | None, files: int) -> list[schemas.BatchItem | HTTPException]:
    """A batch's ``items`` field: one options object per file (none: every file's defaults).
    The array's shape is the request's; each entry's content is its file's, so a bad title
    or metadata rejects that file only."""
    if not value:
        return [schemas.BatchItem() for _ in range(files)]
    try:
        entries = json.loads(value, parse_constant=_no_constant)
    except ValueError as exc:
        raise HTTPException(422, f"items is not valid JSON: {exc}") from None
    if not isinstance(entries, list):
        raise HTTPException(
            422, f"items must be a JSON array of per-file options, not {type(entries).__name__}"
        )
    if len(entries) != files:
        raise HTTPException(
            422, f"items has {len(entries)} entries for {files} files: give one per file, in order"
        )
    out: list[schemas.BatchItem | HTTPException] = []
    for entry in entries:
        try:
            if isinstance(entry, dict) and "metadata" in entry and entry["metadata"] is not None:
                _metadata_of(entry["metadata"])
            out.append(schemas.BatchItem.model_validate(entry))
        except HTTPException as exc:
            out.append(exc)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors()[:3]
            )
            out.append(HTTPException(422, f"options: {problems}"))
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(meta: dict[str, Any]) -> dict[str, Any]:
    bad = [k for k, v in meta.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise HTTPException(422, f"metadata {bad[0]!r} is not a finite number")
    return meta


def _refused_early(name: str, doc_id: str | None, exc: HTTPException) -> IngestResult:
    """A file of a batch refused before it was parsed; its doc_id only if it is one."""
    try:
        validate_doc_id(doc_id or "")
    except ValueError:
        doc_id = None
    return IngestResult(name=name, status="rejected", doc_id=doc_id, reason=str(exc.detail))


def _outcome(result: IngestResult) -> dict[str, Any]:
    """What the audit record says of one upload: not the reason, which may quote the document."""
    return {
        "doc_id": result.doc_id,
        "outcome": result.status,
        "classification": result.classification.value if result.classification else None,
        "acl": result.acl.stored() if result.acl else None,
    }


def _ingest_body(result: IngestResult) -> schemas.IngestResponse:
    return schemas.IngestResponse(
        name=result.name,
        status=result.status,
        doc_id=result.doc_id,
        chunks=result.chunks,
        version=result.version,
        classification=result.classification,
        access=schemas.Access.of(result.acl) if result.acl is not None else None,
        reason=result.reason,
        timings={k: round(v, 6) for k, v in result.timings.items()},
    )
