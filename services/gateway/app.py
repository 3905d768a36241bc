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
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.auth.authenticator import Authenticator
from services.auth.principal import Principal, Role
from services.config import Settings
from services.gateway import schemas
from services.gateway.answering import answer_routes
from services.gateway.auth import authenticate, bearer, principal_of
from services.gateway.metrics import Metrics
from services.kb.classification import Classification, parse_label
from services.kb.errors import KBError
from services.kb.filters import SearchFilter
from services.kb.ingest import IngestResult, validate_doc_id
from services.kb.loaders import CONTENT_TYPES, suffix_of
from services.kb.models import Hit
from services.kb.service import KnowledgeBase
from services.llm.metrics import LLMMetrics
from services.llm.service import AnswerService
from services.sync.publisher import Publisher

log = logging.getLogger(__name__)

_MULTIPART_OVERHEAD = 64 * 1024


def create_app(settings: Settings, kb: KnowledgeBase | None = None) -> FastAPI:
    """Build the gateway. ``kb`` may be passed in (tests share one loaded model)."""
    authenticator = Authenticator(settings.gateway)  # a bad sign-in setting fails here, before serving
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

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        # from the headers alone: no body is read (or spooled to disk) for an anonymous request
        rejection = await authenticate(request, authenticator) or _upload_gate(request)
        response: Response = rejection or await call_next(request)
        route = request.scope.get("route")
        metrics.request_seconds.labels(
            request.method, getattr(route, "path", "unmatched"), str(response.status_code)
        ).observe(time.perf_counter() - started)
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
        body = schemas.Ready(ready=r.ready, model=r.model, milvus=r.milvus, reasons=r.reasons)
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
    ) -> JSONResponse:
        name = source or file.filename or "upload"
        _check_content_type(name, file.content_type)
        label = _label(classification)
        meta = _metadata(metadata)
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
            data, name, doc_id=doc_id, labels=[label], metadata=meta, title=title
        )
        metrics.ingested_documents.labels(result.status).inc()
        if result.status == "ingested" and result.classification is not None:
            metrics.ingested_chunks.labels(result.classification.value).inc(result.chunks)
        code = {"ingested": 201, "skipped": 200, "rejected": 422}[result.status]
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
            classifications=principal_of(request).readable(),
        )
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
        record = knowledge.store.get_document(doc_id)
        if record is None or not principal_of(request).may_read(record.classification):
            raise HTTPException(404, f"no document {doc_id!r}")
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
        if record is not None and not principal_of(request).may_read(record.classification):
            record = None  # not readable is not found: its existence is not disclosed
        chunk = (
            next((c for c in knowledge.store.chunks_of(doc_id, record.version) if c.id == chunk_id), None)
            if record is not None
            else None
        )
        if chunk is None:
            raise HTTPException(404, f"no chunk {chunk_id!r} in the current version of {doc_id!r}")
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
        record = knowledge.store.get_document(doc_id)
        if record is not None and not principal_of(request).may_read(record.classification):
            raise HTTPException(404, f"no document {doc_id!r}")
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
        principal = principal_of(request)
        hits = _search(body.query, body.top_k, body.score_threshold, body.filter, response, principal)
        return schemas.SearchResponse(hits=[_hit_out(h) for h in hits])

    # -- helpers -------------------------------------------------------------------------

    def _search(
        query: str,
        top_k: int | None,
        threshold: float | None,
        flt: SearchFilter | None,
        response: Response,
        principal: Principal | None = None,
    ) -> list[Hit]:
        """Search; with ``principal``, only among the labels it may read (a server-side filter
        the client's own can only narrow)."""
        if principal is not None:
            narrowed = within_clearance(flt, principal)
            if narrowed is None:
                return []  # the client asked only for labels it may not read
            flt = narrowed
        started = time.perf_counter()
        try:
            hits = knowledge.search(query, top_k, threshold, flt)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        elapsed = time.perf_counter() - started
        metrics.search_seconds.observe(elapsed)
        # standard Server-Timing header: lets clients split our latency from Milvus + model time
        response.headers["Server-Timing"] = f"search;dur={elapsed * 1000:.3f}"
        return hits

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
            url=_url(d.doc_id),
        )

    app.include_router(answer_routes(settings, answers, _search, _chunk_url, secured))
    return app


def within_clearance(flt: SearchFilter | None, principal: Principal) -> SearchFilter | None:
    """``flt`` narrowed to the labels ``principal`` may read; None when nothing is left."""
    readable = principal.readable()
    if len(readable) == len(Classification):
        return flt or SearchFilter()
    wanted = flt.classifications if flt is not None and flt.classifications else readable
    allowed = [c for c in wanted if c in readable]
    if not allowed:
        return None
    return (flt or SearchFilter()).model_copy(update={"classifications": allowed})


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
        reason=result.reason,
        timings={k: round(v, 6) for k, v in result.timings.items()},
    )
