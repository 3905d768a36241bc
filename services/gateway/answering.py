"""The answering endpoints: ``POST /v1/ask`` and the OpenAI-compatible ``/v1/chat/completions``.

Both retrieve from the knowledge base, let the sensitivity router decide where the
prompt may go (on every retrieved passage, so a confidential one that would not fit the
prompt still keeps it local), build chat messages with numbered passages, and return the
answer with the passages it cites and the route taken. Model output is cleaned of images
and links to hosts outside the allowlist before it is sent, in streams too.
``/v1/chat/completions`` speaks OpenAI's wire format (including SSE streaming, error bodies
and ``reasoning_content``) so existing clients and tools work unchanged; ``model`` picks
the routing mode (``GET /v1/models``).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from services.config import Settings
from services.gateway import schemas
from services.gateway.audit import AuditEntry, audit_of, passages
from services.gateway.auth import principal_of
from services.kb.answer import citations_for
from services.kb.classification import Classification
from services.kb.embedder import keep_query_vectors
from services.kb.errors import LookupUnsupported
from services.kb.models import Citation, Hit
from services.llm.citations import resolve
from services.llm.dlp import decode_blobs, normalise
from services.llm.endpoints import LLMError
from services.llm.output import LinkFilter, LinkPolicy
from services.llm.prompt import Prompt, PromptTooLong, Turn, build_prompt
from services.llm.reasoning import Delta
from services.llm.router import MAX_IDENTIFIERS, RouteDecision, identifiers
from services.llm.service import AnswerService, Compose, Outcome, Requested
from services.llm.tokens import TokenCounter, TokenizerError

MODES: dict[str, Requested] = {"dualtrack": "auto", "dualtrack-local": "local", "dualtrack-cloud": "cloud"}
CITATION_FIELDS = ("n", "doc_id", "title", "source", "page", "section", "chunk_id", "score", "classification")


def openai_error(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def answer_routes(
    settings: Settings,
    service: AnswerService,
    search: Callable[..., list[Hit]],
    probe: Callable[[list[str]], list[Hit]],
    verbatim: Callable[[list[str], list[Classification]], set[Classification]],
    url: Callable[[str, str], str],
    secured: Sequence[Any],
) -> APIRouter:
    router = APIRouter()
    llm = settings.llm
    links = LinkPolicy([urlsplit(settings.gateway.base_url()).hostname or "", *llm.link_hosts])

    def cited(
        citations: Sequence[Citation], quotes: dict[int, str] | None = None
    ) -> list[schemas.CitationOut]:
        return [
            schemas.CitationOut(
                **{k: getattr(c, k) for k in CITATION_FIELDS},
                url=url(c.doc_id, c.chunk_id),
                quote=(quotes or {}).get(c.n),
            )
            for c in citations
        ]

    def citations_of(
        answer: str, outcome: Outcome, fallback: Prompt
    ) -> tuple[list[schemas.CitationOut], list[int]]:
        """The passages the answer cites (the extractive answerer names its own)."""
        if outcome.citations is not None:
            return cited(outcome.citations), []
        prompt = outcome.prompt or fallback
        found = resolve(answer, prompt.hits, citations_for(prompt.hits))
        return cited(found.citations, found.quotes), found.unknown

    def composer(question: str, hits: list[Hit], history: Sequence[Turn] = ()) -> Compose:
        def compose(counter: TokenCounter) -> Prompt:
            return build_prompt(
                llm.system_prompt,
                question,
                hits,
                context_budget=llm.context_token_budget,
                max_tokens=llm.max_prompt_tokens,
                history=history,
                counter=counter,
            )

        return compose

    async def screen(
        turns: Sequence[Turn], hits: Sequence[Hit], requested: Requested = "auto"
    ) -> RouteDecision:
        """The route, decided on server-side facts the client cannot shape: the prompt's
        passages, what an unfiltered probe of the whole knowledge base finds for each turn
        (neither the client's filter nor its threshold nor the caller's clearance applies), and
        whether each earlier answer is one this gateway gave for the cloud."""
        texts = [t for turn in turns for t in (turn.content, *decode_blobs(normalise(turn.content)).texts)]
        probed = await run_in_threadpool(probe, texts)
        # identifiers are looked up verbatim too: a dense probe may not match a bare code
        barred = [c for c in Classification if c not in service.router.cloud_labels]
        codes, held, unlooked = identifiers(texts), set(), None
        if len(codes) > MAX_IDENTIFIERS:
            unlooked = "too-many-identifiers"
        else:
            try:
                held = await run_in_threadpool(verbatim, codes, barred)
            except LookupUnsupported:  # an engine without infix LIKE: whether a code is stored is unknown
                unlooked = "verbatim-lookup-unavailable"
        vouched = all(service.memory.vouches(t.content) for t in turns[:-1] if t.role == "assistant")
        labels = [*(h.chunk.classification for h in (*hits, *probed)), *held]
        return await run_in_threadpool(
            service.decide,
            [t.content for t in turns],
            labels,
            requested,
            vouched=vouched,
            unlooked=unlooked,
        )

    def remember(answer: str, outcome: Outcome, decision: RouteDecision) -> None:
        if outcome.cloud_eligible(decision):
            service.memory.remember(answer)

    def streamed(
        stream: _Stream, entry: AuditEntry, outcome: Outcome, prompt: Prompt, decision: RouteDecision
    ) -> None:
        _audit_answer(entry, outcome, prompt, stream.citations)
        if stream.answer is not None:
            remember(stream.answer, outcome, decision)

    @router.post(
        "/v1/ask",
        tags=["answers"],
        dependencies=list(secured),
        response_model=schemas.AskResponse,
        summary="Answer a question with citations (routed: cloud or on-prem)",
    )
    async def ask(body: schemas.AskRequest, request: Request, response: Response) -> schemas.AskResponse:
        keep_query_vectors()  # the search and the routing probe share the question's vector
        hits = await run_in_threadpool(
            search,
            body.question,
            body.top_k,
            body.score_threshold,
            body.filter,
            response,
            principal_of(request).reader(),
        )
        decision = await screen([Turn("user", body.question)], hits)
        entry = audit_of(request)
        entry.question, entry.route, entry.route_reason = body.question, decision.target, decision.reason
        compose = composer(body.question, hits)
        try:
            prompt = compose(service.counter(decision.target))
        except PromptTooLong as exc:
            raise HTTPException(413, str(exc)) from None
        except TokenizerError as exc:
            raise HTTPException(422, f"the model's chat template refused the prompt: {exc}") from None
        try:
            text, outcome = await service.complete(
                compose, decision, body.question, prompt.hits, llm.max_tokens
            )
        except LLMError as exc:
            raise HTTPException(
                422 if exc.kind == "model" else 503, f"the model could not answer: {exc}"
            ) from None
        text = links.clean(text)
        citations, unknown = citations_of(text, outcome, prompt)
        _audit_answer(entry, outcome, prompt, citations)
        return schemas.AskResponse(
            answer=text,
            reasoning=links.clean("".join(outcome.reasoning))
            if body.include_reasoning and outcome.reasoning
            else None,
            citations=citations,
            unresolved_citations=unknown,
            route=outcome.route,
            route_reason=outcome.reason,
            failover=outcome.failover,
        )

    @router.get(
        "/v1/models",
        tags=["openai"],
        dependencies=list(secured),
        response_model=schemas.ModelList,
        summary="Models (routing modes) for /v1/chat/completions",
    )
    def models() -> schemas.ModelList:
        return schemas.ModelList(
            data=[schemas.ModelCard(id=k, description=v) for k, v in service.models.items()]
        )

    @router.post(
        "/v1/chat/completions",
        tags=["openai"],
        dependencies=list(secured),
        response_model=schemas.ChatCompletion,
        summary="OpenAI-compatible chat completion with retrieval, citations and routing",
    )
    async def chat_completions(
        body: schemas.ChatCompletionRequest, request: Request, response: Response
    ) -> Any:
        mode = MODES.get(body.model)
        if mode is None:
            return openai_error(
                404,
                f"The model {body.model!r} does not exist; use one of {', '.join(MODES)}",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        turns = [Turn(m.role, m.text()) for m in body.messages if m.role in ("user", "assistant")]
        if not turns or turns[-1].role != "user" or not turns[-1].content.strip():
            return openai_error(
                400,
                "the last message must be a non-empty user message",
                "invalid_request_error",
                param="messages",
            )
        question = turns[-1].content
        max_tokens = body.max_completion_tokens or body.max_tokens or llm.max_tokens
        reader = principal_of(request).reader()
        keep_query_vectors()  # the search and the routing probe share the question's vector
        hits = await run_in_threadpool(search, question, body.top_k, None, body.filter, response, reader)
        # Everything the prompt carries is screened, not only the last question: every turn for
        # personal data and against the knowledge base, so an on-prem answer that quoted a
        # confidential document keeps the whole conversation on the premises.
        decision = await screen(turns, hits, mode)
        entry = audit_of(request)
        entry.question, entry.route, entry.route_reason = question, decision.target, decision.reason
        compose = composer(question, hits, turns[:-1])
        try:
            prompt = compose(service.counter(decision.target))
        except PromptTooLong as exc:
            return openai_error(400, str(exc), "invalid_request_error", "context_length_exceeded", "messages")
        except TokenizerError as exc:
            return openai_error(400, str(exc), "invalid_request_error", "chat_template_error", "messages")
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            outcome = Outcome()
            deltas = service.stream(
                compose, decision, question, prompt.hits, max_tokens, body.temperature, outcome
            )
            # the first delta before the 200: a request no model can answer is an HTTP error
            try:
                first: Delta | None = await anext(deltas)
            except LLMError as exc:
                await deltas.aclose()  # type: ignore[attr-defined]
                status = 400 if exc.kind == "model" else 503
                return openai_error(
                    status,
                    f"the model could not answer: {exc}",
                    "invalid_request_error" if status == 400 else "server_error",
                )
            except StopAsyncIteration:
                first = None
            stream = _Stream(body.model, completion_id, created, max_tokens, links)
            entry.deferred = True  # recorded when the stream ends; its start before it goes out
            if not entry.begin():
                await deltas.aclose()  # type: ignore[attr-defined]
                return openai_error(
                    503, "the audit log cannot be written: the answer was withheld", "server_error"
                )
            return StreamingResponse(
                _audited(
                    stream.events(_prepend(first, deltas), outcome, prompt, citations_of),
                    entry,
                    lambda: streamed(stream, entry, outcome, prompt, decision),
                ),
                media_type="text/event-stream",
                headers={
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                    # retrieval time, as on every other answer (a StreamingResponse does not inherit it)
                    **(
                        {"Server-Timing": response.headers["Server-Timing"]}
                        if "Server-Timing" in response.headers
                        else {}
                    ),
                },
            )
        try:
            text, outcome = await service.complete(
                compose, decision, question, prompt.hits, max_tokens, body.temperature
            )
        except LLMError as exc:
            status = 400 if exc.kind == "model" else 503
            return openai_error(
                status,
                f"the model could not answer: {exc}",
                "invalid_request_error" if status == 400 else "server_error",
            )
        text = links.clean(text)
        used = outcome.prompt or prompt
        citations, unknown = citations_of(text, outcome, prompt)
        _audit_answer(entry, outcome, prompt, citations)
        remember(text, outcome, decision)
        reasoning = links.clean("".join(outcome.reasoning)) or None
        answer_tokens = outcome.completion_tokens - outcome.reasoning_tokens
        return schemas.ChatCompletion(
            id=completion_id,
            created=created,
            model=body.model,
            choices=[
                schemas.ChatChoice(
                    message=schemas.ChatChoiceMessage(content=text, reasoning_content=reasoning),
                    finish_reason=_finish(answer_tokens, max_tokens),
                )
            ],
            usage=_usage(used, outcome),
            citations=citations,
            unresolved_citations=unknown,
            route=outcome.route,
            route_reason=outcome.reason,
        )

    return router


def _finish(tokens: int, limit: int) -> str:
    return "length" if tokens >= limit else "stop"


def _usage(prompt: Prompt, outcome: Outcome) -> schemas.Usage:
    return schemas.Usage(
        prompt_tokens=prompt.tokens,
        completion_tokens=outcome.completion_tokens,
        total_tokens=prompt.tokens + outcome.completion_tokens,
        completion_tokens_details=schemas.CompletionDetails(reasoning_tokens=outcome.reasoning_tokens),
        prompt_tokens_exact=prompt.exact,
    )


def _audit_answer(
    entry: AuditEntry, outcome: Outcome, prompt: Prompt, citations: Sequence[schemas.CitationOut]
) -> None:
    entry.route, entry.route_reason = outcome.route or entry.route, outcome.reason or entry.route_reason
    entry.prompt = passages((outcome.prompt or prompt).hits)
    entry.results = [
        {"chunk_id": c.chunk_id, "doc_id": c.doc_id, "classification": c.classification.value}
        for c in citations
    ]


async def _audited(
    events: AsyncIterator[str], entry: AuditEntry, ended: Callable[[], None]
) -> AsyncIterator[str]:
    """A streamed answer's events; its audit record is written when the stream ends, however."""
    status = 200
    try:
        async for event in events:
            yield event
    except BaseException:
        status = 499  # the client went away, or the stream failed mid-way
        raise
    finally:
        ended()
        entry.finish(status)


async def _prepend(first: Delta | None, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    if first is not None:
        yield first
    async with contextlib.aclosing(rest) as stream:  # type: ignore[type-var]
        async for delta in stream:
            yield delta


class _Stream:
    """OpenAI's stream: a role chunk, reasoning and content chunks, a final chunk (citations,
    route, usage), ``[DONE]``. Content passes the link filter on its way out; a failure after
    the 200 is an error event, never a silently cut answer.

    A client that goes away cancels the generator, which closes the model's stream upstream.
    """

    def __init__(
        self, model: str, completion_id: str, created: int, max_tokens: int, links: LinkPolicy
    ) -> None:
        self.model, self.id, self.created, self.max_tokens = model, completion_id, created, max_tokens
        self.filters = {"content": LinkFilter(links), "reasoning": LinkFilter(links)}
        self.answer: str | None = None
        """The whole answer as the client received it, once the stream completed."""
        self.citations: list[schemas.CitationOut] = []

    def chunk(self, delta: dict, finish: str | None = None, **extra: Any) -> str:
        payload = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def _piece(self, kind: str, text: str) -> str | None:
        if not text:
            return None
        return self.chunk({"reasoning_content": text} if kind == "reasoning" else {"content": text})

    async def events(
        self,
        deltas: AsyncIterator[Delta],
        outcome: Outcome,
        prompt: Prompt,
        citations_of: Callable[[str, Outcome, Prompt], tuple[list[schemas.CitationOut], list[int]]],
    ) -> AsyncIterator[str]:
        yield self.chunk({"role": "assistant", "content": ""})
        answer: list[str] = []
        try:
            async with contextlib.aclosing(deltas) as stream:  # type: ignore[type-var]
                async for delta in stream:
                    text = self.filters[delta.kind].feed(delta.text)
                    if delta.kind == "content":
                        answer.append(text)
                    if (event := self._piece(delta.kind, text)) is not None:
                        yield event
        except LLMError as exc:
            error = {
                "message": f"the model could not answer: {exc}",
                "type": "server_error",
                "code": exc.kind,
            }
            yield f"data: {json.dumps({'error': error})}\n\n"
            yield "data: [DONE]\n\n"
            return
        for kind, filt in self.filters.items():
            rest = filt.finish()
            if kind == "content":
                answer.append(rest)
            if (event := self._piece(kind, rest)) is not None:
                yield event
        citations, unknown = citations_of("".join(answer), outcome, prompt)
        self.answer, self.citations = "".join(answer), citations
        used = outcome.prompt or prompt
        yield self.chunk(
            {},
            _finish(outcome.completion_tokens - outcome.reasoning_tokens, self.max_tokens),
            usage=_usage(used, outcome).model_dump(),
            route=outcome.route,
            route_reason=outcome.reason,
            citations=[c.model_dump() for c in citations],
            unresolved_citations=unknown,
        )
        yield "data: [DONE]\n\n"
