"""The answering endpoints: ``POST /v1/ask`` and the OpenAI-compatible ``/v1/chat/completions``.

Both retrieve from the knowledge base, let the sensitivity router decide where the
prompt may go, build the prompt with numbered passages, and return the answer
with its citations and the route taken. ``/v1/chat/completions`` speaks OpenAI's
wire format (including SSE streaming and error bodies) so existing clients and
tools work unchanged; ``model`` picks the routing mode (``GET /v1/models``).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from services.config import Settings
from services.gateway import schemas
from services.kb.answer import citations_for
from services.kb.models import Citation, Hit
from services.llm.endpoints import LLMError
from services.llm.prompt import Prompt, PromptTooLong, Turn, approx_tokens, build_prompt
from services.llm.service import AnswerService, Outcome, Requested

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
    url: Callable[[str, int | None], str],
    secured: Sequence[Any],
) -> APIRouter:
    router = APIRouter()
    llm = settings.llm

    def cited(citations: Sequence[Citation]) -> list[schemas.CitationOut]:
        return [
            schemas.CitationOut(**{k: getattr(c, k) for k in CITATION_FIELDS}, url=url(c.doc_id, c.page))
            for c in citations
        ]

    def citations_of(prompt: Prompt, outcome: Outcome) -> list[schemas.CitationOut]:
        return cited(outcome.citations or citations_for(prompt.hits))

    def prompt_for(question: str, hits: list[Hit], history: Sequence[Turn] = ()) -> Prompt:
        return build_prompt(
            llm.system_prompt,
            question,
            hits,
            context_budget=llm.context_token_budget,
            max_tokens=llm.max_prompt_tokens,
            history=history,
        )

    @router.post(
        "/v1/ask",
        tags=["answers"],
        dependencies=list(secured),
        response_model=schemas.AskResponse,
        summary="Answer a question with citations (routed: cloud or on-prem)",
    )
    async def ask(body: schemas.AskRequest, response: Response) -> schemas.AskResponse:
        hits = await run_in_threadpool(
            search, body.question, body.top_k, body.score_threshold, body.filter, response
        )
        try:
            prompt = prompt_for(body.question, hits)
        except PromptTooLong as exc:
            raise HTTPException(413, str(exc)) from None
        decision = service.decide(body.question, prompt.hits)
        try:
            text, outcome = await service.complete(
                prompt, decision, body.question, prompt.hits, llm.max_tokens
            )
        except LLMError as exc:
            raise HTTPException(
                422 if exc.kind == "model" else 503, f"the model could not answer: {exc}"
            ) from None
        return schemas.AskResponse(
            answer=text,
            citations=citations_of(prompt, outcome),
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
        hits = await run_in_threadpool(search, question, body.top_k, None, body.filter, response)
        try:
            prompt = prompt_for(question, hits, turns[:-1])
        except PromptTooLong as exc:
            return openai_error(400, str(exc), "invalid_request_error", "context_length_exceeded", "messages")
        # Everything the prompt carries is screened, not only the last question: earlier turns for
        # personal data, and each earlier turn against the knowledge base, so an on-prem answer
        # that quoted a confidential document keeps the whole conversation on the premises.
        screened = list(prompt.hits)
        for turn in turns[:-1]:
            screened += await run_in_threadpool(
                search, turn.content, HISTORY_PROBE_K, HISTORY_MATCH_SCORE, None, Response()
            )
        conversation = "\n".join(t.content for t in turns)
        decision = service.decide(conversation, screened, mode)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            outcome = Outcome()
            deltas = service.stream(
                prompt, decision, question, prompt.hits, max_tokens, body.temperature, outcome
            )
            # the first delta before the 200: a request no model can answer is an HTTP error
            try:
                first = await anext(deltas)
            except LLMError as exc:
                await deltas.aclose()  # type: ignore[attr-defined]
                status = 400 if exc.kind == "model" else 503
                return openai_error(
                    status,
                    f"the model could not answer: {exc}",
                    "invalid_request_error" if status == 400 else "server_error",
                )
            except StopAsyncIteration:
                first = ""
            return StreamingResponse(
                _sse(
                    _prepend(first, deltas),
                    outcome,
                    prompt,
                    body.model,
                    completion_id,
                    created,
                    citations_of,
                    max_tokens,
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
                prompt, decision, question, prompt.hits, max_tokens, body.temperature
            )
        except LLMError as exc:
            status = 400 if exc.kind == "model" else 503
            return openai_error(
                status,
                f"the model could not answer: {exc}",
                "invalid_request_error" if status == 400 else "server_error",
            )
        completion_tokens = outcome.completion_tokens or approx_tokens(text)
        return schemas.ChatCompletion(
            id=completion_id,
            created=created,
            model=body.model,
            choices=[
                schemas.ChatChoice(
                    message=schemas.ChatChoiceMessage(content=text),
                    finish_reason=_finish(completion_tokens, max_tokens),
                )
            ],
            usage=schemas.Usage(
                prompt_tokens=prompt.tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt.tokens + completion_tokens,
            ),
            citations=citations_of(prompt, outcome),
            route=outcome.route,
            route_reason=outcome.reason,
        )

    return router


HISTORY_PROBE_K = 3
HISTORY_MATCH_SCORE = 0.5
"""An earlier turn this close to a stored chunk is treated as carrying that chunk's content."""


def _finish(tokens: int, limit: int) -> str:
    return "length" if tokens >= limit else "stop"


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    if first:
        yield first
    async with contextlib.aclosing(rest) as stream:  # type: ignore[type-var]
        async for delta in stream:
            yield delta


def _chunk(
    completion_id: str, created: int, model: str, delta: dict, finish: str | None = None, **extra: Any
) -> str:
    payload = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return f"data: {json.dumps(payload)}\n\n"


async def _sse(
    deltas: AsyncIterator[str],
    outcome: Outcome,
    prompt: Prompt,
    model: str,
    completion_id: str,
    created: int,
    citations_of: Callable[[Prompt, Outcome], list[schemas.CitationOut]],
    max_tokens: int,
) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk, content chunks, a final chunk (citations, route, usage), [DONE].

    A client that goes away cancels this generator, which closes the model's stream upstream.
    """
    yield _chunk(completion_id, created, model, {"role": "assistant", "content": ""})
    try:
        async with contextlib.aclosing(deltas) as stream:  # type: ignore[type-var]
            async for delta in stream:
                yield _chunk(completion_id, created, model, {"content": delta})
    except LLMError as exc:
        error = {"message": f"the model could not answer: {exc}", "type": "server_error", "code": exc.kind}
        yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"
        return
    usage = {
        "prompt_tokens": prompt.tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": prompt.tokens + outcome.completion_tokens,
    }
    yield _chunk(
        completion_id,
        created,
        model,
        {},
        _finish(outcome.completion_tokens, max_tokens),
        usage=usage,
        route=outcome.route,
        route_reason=outcome.reason,
        citations=[c.model_dump() for c in citations_of(prompt, outcome)],
    )
    yield "data: [DONE]\n\n"
