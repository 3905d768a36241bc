"""What an answer is called after the cloud fails partway, against real HTTP endpoints.

The cloud and on-prem models are one TEST DOUBLE OpenAI-compatible server (below); the
answering service, its endpoint clients and its breaker are the product's own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry

from services.config import load_settings
from services.kb.models import Answer
from services.llm.metrics import LLMMetrics
from services.llm.prompt import Message, Prompt
from services.llm.router import RouteDecision
from services.llm.service import CONTINUED, CONTINUED_EXTRACTIVE, AnswerService, Outcome


def flaky_models() -> FastAPI:
    """TEST DOUBLE: ``thinks-then-drops`` streams reasoning and breaks before any answer;
    ``says-then-drops`` breaks after part of an answer; ``answers`` answers."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        model = (await request.json())["model"]
        deltas = {
            "thinks-then-drops": [{"reasoning_content": "Let me look at passage 1."}],
            "says-then-drops": [{"content": "Thirty"}],
            "answers": [{"content": "Thirty days [1]."}],
        }[model]
        lines = [f"data: {json.dumps({'choices': [{'delta': d}]})}" for d in deltas]
        lines += ["data: [DONE]"] if model == "answers" else ["data: {broken"]

        async def body():
            for line in lines:
                yield line + "\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    from tests.support import serve

    with serve(flaky_models(), ready_path="/docs") as base:
        yield base


PROMPT = Prompt(messages=(Message("user", "How many days?"),), hits=[], tokens=4, exact=False)
CLOUD = RouteDecision("cloud", "no-sensitive-content")


def _service(url: str, cloud_model: str, local: bool) -> AnswerService:
    llm = {"cloud": {"kind": "openai", "url": url, "model": cloud_model}}
    if local:
        llm["local"] = {"kind": "openai", "url": url, "model": "answers"}
    settings = load_settings(llm=llm).llm
    extractive = lambda q, hits: Answer(text="From the passages.", citations=[], route="extractive")  # noqa: E731
    return AnswerService(settings, extractive, LLMMetrics(CollectorRegistry()))


def _stream(service: AnswerService) -> tuple[list[tuple[str, str]], Outcome]:
    outcome = Outcome()

    async def run() -> list[tuple[str, str]]:
        try:
            return [
                (d.kind, d.text)
                async for d in service.stream(
                    lambda _: PROMPT, CLOUD, "How many days?", [], 16, None, outcome
                )
            ]
        finally:
            await service.aclose()

    return asyncio.run(run()), outcome


@pytest.mark.parametrize(("local", "route"), [(True, "cloud+local"), (False, "cloud+extractive")])
def test_cloud_reasoning_then_a_failure_is_not_a_cloud_answer(url: str, local: bool, route: str) -> None:
    deltas, outcome = _stream(_service(url, "thinks-then-drops", local))
    assert deltas[0] == ("reasoning", "Let me look at passage 1.")  # the user saw the cloud think
    assert outcome.failover and outcome.route == route
    assert ("content", CONTINUED) not in deltas  # no answer was cut: no note
    assert deltas[-1][0] == "content"  # the answer came after all
    assert not outcome.cloud_eligible(CLOUD)  # a later turn quoting it is not vouched for


def test_a_cut_cloud_answer_is_marked_and_continued_on_prem(url: str) -> None:
    deltas, outcome = _stream(_service(url, "says-then-drops", True))
    assert deltas[:2] == [("content", "Thirty"), ("content", CONTINUED)]
    assert ("content", "Thirty days [1].") in deltas
    assert outcome.route == "cloud+local" and not outcome.cloud_eligible(CLOUD)
    deltas, outcome = _stream(_service(url, "says-then-drops", False))  # no on-prem model
    assert deltas == [
        ("content", "Thirty"),
        ("content", CONTINUED_EXTRACTIVE),
        ("content", "From the passages."),
    ]
    assert outcome.route == "cloud+extractive"


def test_a_whole_cloud_answer_is_cloud_eligible(url: str) -> None:
    deltas, outcome = _stream(_service(url, "answers", True))
    assert deltas == [("content", "Thirty days [1].")]
    assert outcome.route == "cloud" and outcome.failover is None and outcome.cloud_eligible(CLOUD)
