"""FastAPI application: documents, search, answers (``answering.py``), health and metrics.

Endpoints are plain ``def`` functions: embedding and Milvus calls block, and
FastAPI runs such endpoints in its thread pool. The knowledge base loads its
model in a background thread at start-up so ``/healthz`` answers at once and
``/readyz`` tells when (and why not) the service can serve.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.audit import egress
from services.audit.log import AuditLog
from services.auth.authenticator import Authenticator
from services.auth.errors import AuthError
from services.auth.principal import Principal, Role
from services.config import Settings
from services.gateway import schemas
from services.gateway.answering import answer_routes
from services.gateway.audit import Auditor, audit_of, passages
from services.gateway.auth import (
    DOCS_ASSETS,
    authenticate,
    bearer,
    is_probe,
    is_public,
    own_path,
    principal_of,
)
from services.gateway.documents import document_routes
from services.gateway.metrics import Metrics
from services.kb.access import EVERYTHING, Reader
from services.kb.classification import Classification
from services.kb.errors import KBError
from services.kb.filters import SearchFilter
from services.kb.models import Hit
from services.kb.service import KnowledgeBase
from services.llm.metrics import LLMMetrics
from services.llm.service import AnswerService
from services.sync.publisher import Publisher

log = logging.getLogger(__name__)

_MULTIPART_OVERHEAD = 64 * 1024
UPLOADS = ("/v1/documents", "/v1/documents/batch")
"""The upload paths: size-checked from their headers, recorded before they act."""


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

    app = FastAPIOffline(  # /docs and /redoc load their scripts from here, never from a CDN
        static_url=DOCS_ASSETS,
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
    max_request = settings.gateway.max_request_bytes

    def auth(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        """The middleware authenticated the request; this declares the scheme in OpenAPI."""
        assert request.state.principal is not None

    def reader(request: Request) -> None:
        _require(principal_of(request), Role.READER)

    signed_in = [Depends(auth)]
    secured = [*signed_in, Depends(reader)]  # every endpoint that reads content

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
        rejection = await authenticate(request, authenticator) or _body_gate(request)
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
        if not is_public(request) and not is_probe(request):
            entry.principal = getattr(request.state, "principal", None)
            entry.route_path, entry.target = route_path, dict(request.scope.get("path_params") or {})
            if not entry.deferred and not entry.finish(response.status_code):
                response = _unrecorded()  # fail closed: what cannot be recorded is not handed out
        response.headers["X-Request-ID"] = entry.request_id
        return response

    def _body_gate(request: Request) -> Response | None:
        """Every body is size-checked from its headers alone, so an oversized (or length-less,
        chunked) one is never read, nor an upload spooled to disk: uploads up to
        ``ingest.max_file_bytes``, anything else up to ``gateway.max_request_bytes``."""
        upload = request.method == "POST" and own_path(request) in UPLOADS
        if upload:
            try:  # the role is checked before the body is read, too
                _require(principal_of(request), Role.CONTRIBUTOR)
            except HTTPException as exc:
                return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        length = request.headers.get("content-length")
        if length is None and (upload or "transfer-encoding" in request.headers):
            what = "uploads need" if upload else "a request body needs"
            return JSONResponse(
                {"detail": f"{what} a Content-Length header"}, status_code=status.HTTP_411_LENGTH_REQUIRED
            )
        if length is None:
            return None
        limit, key = (
            (max_upload, "ingest.max_file_bytes") if upload else (max_request, "gateway.max_request_bytes")
        )
        if not length.isdigit() or int(length) > limit + (_MULTIPART_OVERHEAD if upload else 0):
            what = "upload" if upload else "request body"
            return JSONResponse(
                {"detail": f"{what} is {length} bytes, over the limit of {limit} ({key})"},
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
    async def healthz() -> dict[str, str]:  # on the event loop: busy worker threads cannot stall it
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        response_model=schemas.Ready,
        responses={503: {"model": schemas.Ready}},
        summary="Readiness: model loaded and Milvus reachable",
    )
    async def readyz(request: Request) -> JSONResponse:
        r = await asyncio.to_thread(knowledge.readiness)
        body = schemas.Ready(ready=r.ready)
        if await _monitors(request):
            body = schemas.Ready(
                ready=r.ready, model=r.model, milvus=r.milvus, reasons=r.reasons, notes=r.notes
            )
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if r.ready else 503)

    async def _monitors(request: Request) -> bool:
        """Whether the request's credentials (if any) carry the monitor role; a probe without
        any, or with bad ones, gets the bare answer, never an error."""
        if request.headers.get("authorization") is None:
            return False
        try:
            return (await authenticator.principal(request.headers["authorization"])).has(Role.MONITOR)
        except AuthError:
            return False

    def monitor(request: Request) -> None:
        _require(principal_of(request), Role.MONITOR)

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics (the monitor role)",
        dependencies=[*signed_in, Depends(monitor)],
    )
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

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

    app.include_router(document_routes(settings, knowledge, metrics, secured, writes, [Depends(admin)], _url))
    app.include_router(answer_routes(settings, answers, _search, _probe, _verbatim, _chunk_url, secured))
    return app


def _mutates(request: Request) -> bool:
    """An upload, a delete or an access change: recorded before it acts, too."""
    return request.method in ("PUT", "PATCH", "DELETE") or (
        request.method == "POST" and own_path(request) in UPLOADS
    )


def _unrecorded() -> JSONResponse:
    return JSONResponse(
        {"detail": "the audit log cannot be written: the request was not carried out; try again later"},
        status_code=503,
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
