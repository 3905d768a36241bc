"""A reasoning model behind the gateway: ``<think>`` split from the answer in every chunking,
``reasoning_content`` on the OpenAI wire, hidden by /v1/ask unless asked, never cited, capped,
and a model that only thinks (or says nothing) failing over instead of answering with nothing.

The model is a TEST DOUBLE speaking the OpenAI streaming protocol with DeepSeek-R1's output
shape (tags split across chunks at awkward places); prompt tokens are counted with DeepSeek's
real tokenizer from its GGUF header.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from services.config import load_settings
from services.gateway.app import create_app
from services.kb.service import KnowledgeBase
from tests.support import SAMPLES, deepseek_gguf_header, serve, wait_ready

KEY = "reasoning-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
Q = "How many vacation days do full-time employees get per year?"
R1 = (
    "<think>\nThe passage [2] mentions carry-over; passage 1 says thirty.\n</think>\n\n"
    "Thirty days a year [1]."
)
SCRIPTS = {
    "normal": R1,
    "unterminated": "<think>\nStill weighing the passages and never done",
    "long": "<think>" + "hmm " * 400 + "</think>Thirty [1].",
    "empty": "<think>nothing to say</think>\n\n",
}


def reasoning_model() -> FastAPI:
    """TEST DOUBLE: an OpenAI-compatible server with a reasoning model's output.

    The last user message picks the script (its first word); ``api`` sends the reasoning
    apart as DeepSeek's API does. Every request is recorded in ``app.state.seen``.
    """
    app = FastAPI()
    app.state.seen = []

    @app.get("/v1/models")
    def models() -> dict:
        return {"data": [{"id": "r1"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        app.state.seen.append(body)
        question = body["messages"][-1]["content"]
        word = question.split()[0].lower()
        if word == "api":
            deltas = [{"reasoning_content": "Passage 1 says thirty."}, {"content": "Thirty days [1]."}]
        else:
            text = SCRIPTS.get(word, R1)
            sizes = [1, 2, 3, 5, 7]
            pieces, i, k = [], 0, 0
            while i < len(text):  # awkward chunking: tags arrive in pieces
                pieces.append(text[i : i + sizes[k % len(sizes)]])
                i += sizes[k % len(sizes)]
                k += 1
            deltas = [{"content": p} for p in pieces]

        async def events():
            for d in deltas:
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': d}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def models() -> Iterator[tuple[str, FastAPI, str, FastAPI]]:
    cloud_app, local_app = reasoning_model(), reasoning_model()
    with (
        serve(cloud_app, ready_path="/v1/models") as cloud,
        serve(local_app, ready_path="/v1/models") as local,
    ):
        yield cloud, cloud_app, local, local_app


@pytest.fixture(scope="module")
def gateway(models, tmp_path_factory: pytest.TempPathFactory, embedder) -> Iterator[str]:
    cloud, _, local, _ = models
    endpoint = {"kind": "openai", "model": "r1", "reasoning": True, "tokenizer": str(deepseek_gguf_header())}
    settings = load_settings(
        milvus={"uri": str(tmp_path_factory.mktemp("kb") / "kb.db")},
        gateway={"api_key": KEY},
        llm={
            "cloud": {**endpoint, "url": cloud},
            "local": {**endpoint, "url": local},
            "max_reasoning_tokens": 120,
            "breaker": {"failure_threshold": 50},
        },
    )
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    kb.ingestor.ingest_path(SAMPLES / "handbook" / "employee-handbook.md", root=SAMPLES)
    with serve(create_app(settings, kb)) as url:
        wait_ready(url)
        yield url
    kb.close()


def _chat(url: str, question: str, stream: bool = False) -> httpx.Response:
    body = {"model": "dualtrack", "messages": [{"role": "user", "content": question}], "stream": stream}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def _events(url: str, question: str) -> list[dict]:
    text = _chat(url, question, stream=True).text
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_reasoning_is_apart_from_the_answer(gateway: str) -> None:
    body = _chat(gateway, f"normal {Q}").json()
    message = body["choices"][0]["message"]
    assert message["content"] == "Thirty days a year [1]."
    assert message["reasoning_content"].strip().startswith("The passage [2] mentions carry-over")
    assert body["route"] == "cloud" and [c["n"] for c in body["citations"]] == [1]  # [2] was only thought
    usage = body["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] > 5 and usage["prompt_tokens_exact"]
    assert usage["completion_tokens"] > usage["completion_tokens_details"]["reasoning_tokens"]


def test_streams_carry_reasoning_content_then_content(gateway: str) -> None:
    events = _events(gateway, f"normal {Q}")
    deltas = [e["choices"][0]["delta"] for e in events[1:-1]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    assert "<think>" not in reasoning + content and "</think>" not in reasoning + content
    assert content == "Thirty days a year [1]." and "passage 1 says thirty" in reasoning
    last_reasoning = max(i for i, d in enumerate(deltas) if d.get("reasoning_content"))
    first_content = min(i for i, d in enumerate(deltas) if d.get("content"))
    assert last_reasoning < first_content
    assert [c["n"] for c in events[-1]["citations"]] == [1]


def test_ask_hides_reasoning_unless_asked(gateway: str) -> None:
    hidden = httpx.post(
        f"{gateway}/v1/ask", json={"question": f"normal {Q}"}, headers=AUTH, timeout=60
    ).json()
    assert hidden["answer"] == "Thirty days a year [1]." and hidden["reasoning"] is None
    shown = httpx.post(
        f"{gateway}/v1/ask",
        json={"question": f"normal {Q}", "include_reasoning": True},
        headers=AUTH,
        timeout=60,
    ).json()
    assert "passage 1 says thirty" in shown["reasoning"]


def test_reasoning_sent_apart_by_the_server_stays_apart(gateway: str) -> None:
    message = _chat(gateway, f"api {Q}").json()["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == (
        "Thirty days [1].",
        "Passage 1 says thirty.",
    )


@pytest.mark.parametrize(
    "script, why",
    [
        ("unterminated", "still reasoning"),
        ("long", "max_reasoning_tokens=120"),
        ("empty", "empty answer"),
    ],
)
def test_a_model_that_only_thinks_fails_over_then_errors(gateway: str, models, script: str, why: str) -> None:
    local_app = models[3]
    before = len(local_app.state.seen)
    body = httpx.post(f"{gateway}/v1/ask", json={"question": f"{script} {Q}"}, headers=AUTH, timeout=60)
    # the cloud's failure is the request's ("model"): the local model is asked, fails alike -> 422
    assert body.status_code == 422 and why in body.json()["detail"]
    assert len(local_app.state.seen) == before + 1
    events = _events(gateway, f"{script} {Q}")
    assert "error" in events[-1] and why in events[-1]["error"]["message"]  # never a silent cut


def test_the_prompt_is_chat_messages_with_the_passages_as_data(gateway: str, models) -> None:
    _, cloud_app, _, _ = models
    _chat(gateway, f"normal {Q}")
    messages = cloud_app.state.seen[-1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    assert '<passage n="1"' in messages[0]["content"] and messages[1]["content"] == f"normal {Q}"
    assert cloud_app.state.seen[-1]["max_tokens"] == 512 + 120  # the answer's budget plus reasoning's


def test_reasoning_settings_are_validated(tmp_path: Path) -> None:
    from services.config import ConfigError

    with pytest.raises(ConfigError, match="max_reasoning_tokens"):
        load_settings(llm={"max_reasoning_tokens": 0})
