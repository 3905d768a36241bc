"""FastAPI application: documents, search, answers (``answering.py``), health and metrics.

Endpoints are plain ``def`` functions: embedding and Milvus calls block, and
FastAPI runs such endpoints in its thread pool. The knowledge base loads its
model in a background thread at start-up so ``/healthz`` answers at once and
``/readyz`` tells when (and why not) the service can serve.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, Response, UploadFile, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.audit import egress
from services.audit.log import AuditLog
from services.auth.authenticator import Authenticator
from services.auth.principal import Principal, Role
from services.config import Settings
from services.gateway import schemas
from services.gateway.answering import answer_routes
from services.gateway.audit import Auditor, audit_of, passages
from services.gateway.auth import authenticate, bearer, is_public, principal_of
from services.gateway.metrics import Metrics
from services.kb.access import EVERYTHING, Acl, AclError, Reader
from services.kb.classification import Classification, parse_label
from services.kb.errors import KBError
from services.kb.filters import SearchFilter
from services.kb.ingest import IngestResult, WriteRefused, validate_doc_id
from services.kb.loaders import CONTENT_TYPES, suffix_of
from services.kb.models import Hit
from services.kb.service import KnowledgeBase
from services.kb.store import DocumentRecord
from services.llm.metrics import LLMMetrics
from services.llm.service import AnswerService
from services.sync.publisher import Publisher

log = logging.getLogger(__name__)

_MULTIPART_OVERHEAD = 64 * 1024


def create_app(settings: Settings, kb: KnowledgeBase | None = None) -> FastAPI:
    """Build the gateway. ``kb`` may be passed in (tests share one loaded model)."""
    authenticator = Authenticator(settings.gateway)  # a bad sign-in setting fails here, before serving
    auditor = Auditor(AuditLog(settings.audit) if settings.audit.enabled else None, settings.audit.questions)
    knowledge = kb or KnowledgeBase(settings)
    metrics = Metrics()
    answers = AnswerService(settings.llm, knowledge.answer, LLMMetrics(metrics.registry))
    publisher = publisher_for(settings, knowledge, metrics.registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starter = threading.Thread(target=knowledge.start, name="kb-start", daemon=True)
        starter.start()
        await answers.start()
        if publisher is not None:
            publisher.start()
        yield
        await answers.aclose()
        await authenticator.aclose()
        auditor.close()
        if publisher is not None:
            publisher.close()
        knowledge.close()

    app = FastAPI(
        title="dualtrack gateway",
        version="0.1.0",
        summary="Private knowledge base: ingest, search and cited answers",
        lifespan=lifespan,
    )
    app.state.authenticator = authenticator
    app.state.kb = knowledge
    app.state.metrics = metrics
    app.state.answers = answers
    base_url = settings.gateway.base_url()
    max_upload = settings.ingest.max_file_bytes

    def auth(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        """The middleware authenticated the request; this declares the scheme in OpenAPI."""
        assert request.state.principal is not None

    secured = [Depends(auth)]

    def contributor(request: Request) -> None:
        _require(principal_of(request), Role.CONTRIBUTOR)

    writes = [*secured, Depends(contributor)]

    def admin(request: Request) -> None:
        _require(principal_of(request), Role.ADMIN)

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        entry = request.state.audit = auditor.begin(request)
        egress.collecting(entry.egress)
        # from the headers alone: no body is read (or spooled to disk) for an anonymous request
        rejection = await authenticate(request, authenticator) or _upload_gate(request)
        if rejection is None and _mutates(request):
            entry.principal = getattr(request.state, "principal", None)
            if not entry.begin():
                rejection = _unrecorded()  # fail closed: nothing is changed that cannot be recorded
        try:
            response: Response = rejection or await call_next(request)
        except Exception:
            entry.principal = getattr(request.state, "principal", None)
            entry.finish(500)  # a crash is recorded too
            raise
        route = request.scope.get("route")
        route_path = getattr(route, "path", None)
        metrics.request_seconds.labels(
            request.method, route_path or "unmatched", str(response.status_code)
        ).observe(time.perf_counter() - started)
        if not is_public(request):
            entry.principal = getattr(request.state, "principal", None)
            entry.route_path, entry.target = route_path, dict(request.scope.get("path_params") or {})
            if not entry.deferred and not entry.finish(response.status_code):
                response = _unrecorded()  # fail closed: what cannot be recorded is not handed out
        response.headers["X-Request-ID"] = entry.request_id
        return response

    def _upload_gate(request: Request) -> Response | None:
        """Uploads are size-checked from their headers alone, so an oversized (or length-less,
        chunked) body is never written to disk."""
        if request.method != "POST" or request.url.path != "/v1/documents":
            return None
        try:  # the role is checked before the body is read, too
            _require(principal_of(request), Role.CONTRIBUTOR)
        except HTTPException as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        length = request.headers.get("content-length", "")
        if not length.isdigit():
            return JSONResponse(
                {"detail": "uploads need a Content-Length header"},
                status_code=status.HTTP_411_LENGTH_REQUIRED,
            )
        if int(length) > max_upload + _MULTIPART_OVERHEAD:
            return JSONResponse(
                {
                    "detail": f"upload is {length} bytes, over the limit of {max_upload} "
                    "(ingest.max_file_bytes)"
                },
                status_code=status.HTTP_413_CONTENT_TOO_LARGE,
            )
        return None

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the problems without the offending input: it may be confidential, or not encodable
        problems = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": jsonable_encoder(problems)}, status_code=422)

    @app.exception_handler(KBError)
    async def kb_error(request: Request, exc: KBError) -> JSONResponse:
        # documents are checked by the endpoints; what reaches here is Milvus or the model
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=503)

    # -- health --------------------------------------------------------------------------

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        response_model=schemas.Ready,
        responses={503: {"model": schemas.Ready}},
        summary="Readiness: model loaded and Milvus reachable",
    )
    def readyz() -> JSONResponse:
        r = knowledge.readiness()
        body = schemas.Ready(ready=r.ready, model=r.model, milvus=r.milvus, reasons=r.reasons, notes=r.notes)
        return JSONResponse(body.model_dump(), status_code=200 if r.ready else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- documents -----------------------------------------------------------------------

    @app.post(
        "/v1/documents",
        tags=["documents"],
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
        name = source or file.filename or "upload"
        _check_content_type(name, file.content_type)
        label = _label(classification)
        meta = _metadata(metadata)
        principal = principal_of(request)
        try:
            acl = Acl.of(groups or (), users or (), "upload") if groups or users else None
        except AclError as exc:
            raise HTTPException(422, str(exc)) from None
        if doc_id is not None:
            try:
                validate_doc_id(doc_id)
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from None
        data = file.file.read(max_upload + 1)
        if len(data) > max_upload:
            raise HTTPException(
                413, f"{name}: upload is over the limit of {max_upload} bytes (ingest.max_file_bytes)"
            )
        result = knowledge.ingestor.ingest_bytes(
            data,
            name,
            doc_id=doc_id,
            labels=[label],
            acls=[acl],
            default_acl=None if principal.has(Role.ADMIN) else principal.own_acl(),
            metadata=meta,
            title=title,
            authorize=lambda new, current: _may_write(principal, new, current),
        )
        audit_of(request).detail = {
            "doc_id": result.doc_id,
            "outcome": result.status,
            "classification": result.classification.value if result.classification else None,
            "acl": result.acl.stored() if result.acl else None,
        }  # not the reason: a parser's message may quote the document
        metrics.ingested_documents.labels(result.status).inc()
        if result.status == "ingested" and result.classification is not None:
            metrics.ingested_chunks.labels(result.classification.value).inc(result.chunks)
        code = {"ingested": 201, "skipped": 200, "rejected": 422, "refused": 403}[result.status]
        return JSONResponse(_ingest_body(result).model_dump(mode="json"), status_code=code)

    @app.get(
        "/v1/documents",
        tags=["documents"],
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

    @app.get(
        "/v1/documents/{doc_id}",
        tags=["documents"],
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

    @app.get(
        "/v1/documents/{doc_id}/chunks/{chunk_id}",
        tags=["documents"],
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
            document_url=_url(doc_id, chunk.page or None),
        )

    @app.put(
        "/v1/documents/{doc_id}/access",
        tags=["documents"],
        dependencies=[*secured, Depends(admin)],
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

    @app.delete(
        "/v1/documents/{doc_id}",
        tags=["documents"],
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

    # -- retrieval -----------------------------------------------------------------------

    @app.post(
        "/v1/search",
        tags=["retrieval"],
        dependencies=secured,
        response_model=schemas.SearchResponse,
        summary="Semantic search over chunks",
    )
    def search(body: schemas.SearchRequest, request: Request, response: Response) -> schemas.SearchResponse:
        reader = principal_of(request).reader()
        hits = _search(body.query, body.top_k, body.score_threshold, body.filter, response, reader)
        entry = audit_of(request)
        entry.question, entry.results = body.query, passages(hits)
        return schemas.SearchResponse(hits=[_hit_out(h) for h in hits])

    # -- helpers -------------------------------------------------------------------------

    def _search(
        query: str,
        top_k: int | None,
        threshold: float | None,
        flt: SearchFilter | None,
        response: Response,
        reader: Reader,
    ) -> list[Hit]:
        """Search among what ``reader`` may read: a filter applied in Milvus, which the client's
        own ``flt`` is ANDed with, so it can only narrow the result."""
        started = time.perf_counter()
        try:
            hits = knowledge.search(query, top_k, threshold, flt, reader=reader)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        elapsed = time.perf_counter() - started
        metrics.search_seconds.observe(elapsed)
        # standard Server-Timing header: lets clients split our latency from Milvus + model time
        response.headers["Server-Timing"] = f"search;dur={elapsed * 1000:.3f}"
        return hits

    def _probe(texts: list[str]) -> list[Hit]:
        """What routing decides on besides the prompt: each text searched against the whole
        knowledge base (no client filter, threshold or clearance), in one Milvus call, with
        the query vectors the caller's own search already made (kept for the request)."""
        texts = [t for t in texts if t.strip()]
        if not texts:
            return []
        routing = settings.llm.routing
        vectors = knowledge.embedder.embed_queries(texts)
        found = knowledge.store.search(vectors, routing.probe_k, None, routing.probe_score, reader=EVERYTHING)
        return [h for hits in found for h in hits]

    def _verbatim(fragments: list[str], among: list[Classification]) -> set[Classification]:
        return knowledge.store.labels_containing(fragments, among)  # the store exists once the model does

    def _url(doc_id: str, page: int | None = None) -> str:
        return f"{base_url}/v1/documents/{doc_id}" + (f"#page={page}" if page else "")

    def _chunk_url(doc_id: str, chunk_id: str) -> str:
        return f"{base_url}/v1/documents/{doc_id}/chunks/{chunk_id}"

    def _hit_out(h: Hit) -> schemas.SearchHit:
        c = h.chunk
        return schemas.SearchHit(
            doc_id=c.doc_id,
            chunk_id=c.id,
            chunk_no=c.chunk_no,
            score=round(h.score, 4),
            fused_score=None if h.fused is None else round(h.fused, 6),
            text=c.text,
            source=c.source,
            title=c.metadata.get("title"),
            page=c.page or None,
            section=c.sections,
            classification=c.classification,
            url=_url(c.doc_id, c.page or None),
        )

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
            url=_url(d.doc_id),
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
        if not principal.has(Role.ADMIN) and not added.within(principal.tokens()):
            raise WriteRefused(
                f"you may give access only to your own groups or yourself; the document's access "
                f"list would be [{new.acl}], and {principal.subject!r} is in: "
                f"{', '.join(sorted(principal.groups)) or 'no groups'}"
            )

    app.include_router(answer_routes(settings, answers, _search, _probe, _verbatim, _chunk_url, secured))
    return app


def _mutates(request: Request) -> bool:
    """An upload, a delete or an access change: recorded before it acts, too."""
    return request.method in ("PUT", "PATCH", "DELETE") or (
        request.method == "POST" and request.url.path.endswith("/v1/documents")
    )


def _unrecorded() -> JSONResponse:
    return JSONResponse(
        {"detail": "the audit log cannot be written: the request was not carried out; try again later"},
        status_code=503,
    )


def _unmanaged(principal: Principal, record: DocumentRecord) -> str:
    groups = ", ".join(sorted(principal.groups)) or "none"
    return (
        f"{record.doc_id!r} is shared with [{record.acl}]: a contributor may change documents shared "
        f"with one of its groups; {principal.subject!r} is in: {groups}"
    )


def _require(principal: Principal, role: Role) -> None:
    if not principal.has(role):
        held = ", ".join(sorted(r.value for r in principal.roles)) or "none"
        raise HTTPException(403, f"this needs the {role.value} role; {principal.subject!r} has: {held}")


def publisher_for(
    settings: Settings, knowledge: KnowledgeBase, registry: CollectorRegistry
) -> Publisher | None:
    """The sync publisher, when ``sync.publish`` is on: told of every successful write."""
    if not settings.sync.publish:
        return None
    publisher = Publisher(settings, lambda: knowledge.store, lambda: knowledge.embedder.model_id, registry)
    knowledge.listener = publisher
    return publisher


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
        meta = json.loads(value)
    except json.JSONDecodeError as exc:
        raise HTTPException(422, f"metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str | int | float | bool) for v in meta.values()):
        raise HTTPException(422, "metadata must be a JSON object of strings, numbers and booleans")
    return meta


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
