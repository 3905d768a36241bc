"""Endpoint clients against a misbehaving server: every oddity becomes a classified LLMError or
is tolerated, never a raw exception (which would bypass failover)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from services.config import EndpointSettings, load_settings
from services.llm.endpoints import LLMError, OpenAIEndpoint, TritonEndpoint
from services.llm.prompt import Message, Prompt
from services.tritonserver import TritonServer
from tests.support import serve


def misbehaving_server() -> FastAPI:
    """TEST DOUBLE: an LLM server with the quirks real ones have (and a few broken ones)."""
    app = FastAPI()

    def sse(lines: list[str], delay: float = 0.0):
        async def body():
            for line in lines:
                if delay:
                    await asyncio.sleep(delay)
                yield line + "\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        model = (await request.json())["model"]
        if model == "unauthorized":
            return JSONResponse({"error": {"message": "jwt expired"}}, status_code=401)
        if model == "refuses":
            return JSONResponse({"error": {"message": "prompt too long"}}, status_code=400)
        if model == "deepseek":  # DeepSeek's API: reasoning apart, in reasoning_content
            chunks = [
                {"choices": [{"delta": {"role": "assistant", "content": None, "reasoning_content": "Hm."}}]},
                {"choices": [{"delta": {"content": "Yes."}}]},
            ]
            return sse([f"data: {json.dumps(c)}" for c in chunks] + ["data: [DONE]"])
        if model == "azure":  # an empty choices list first, null deltas, [DONE] without a space
            chunks = [
                {"choices": []},
                {"choices": [{"delta": None}]},
                {"choices": [{"delta": {"content": "Hel"}}]},
                {"choices": [{"delta": {"content": "lo"}}]},
            ]
            return sse([f"data: {json.dumps(c)}" for c in chunks] + ["data:[DONE]"])
        return sse(['data: {"choices": [{"delta": {"content": "ok"}}]}', "data: {not json"])

    @app.post("/v2/models/{model}/generate_stream")
    async def generate_stream(model: str, request: Request):
        body = await request.json()
        if model == "llmapi":  # the LLM-API model streams the whole text so far
            assert body["sampling_param_max_tokens"] == [8] and body["streaming"] == [True]
            assert json.loads(body["messages"][0]) == [{"role": "user", "content": "hi"}]
            return sse(
                [f"data: {json.dumps({'text_output': [t]})}" for t in ("The", "The sky", "The sky is blue")]
            )
        if model == "silent":  # keep-alives only: httpx's read timeout never fires
            return sse([": ping"] * 40, delay=0.1)
        return sse(['data: {"error": "model exploded"}'])

    return app


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve(misbehaving_server(), ready_path="/docs") as base:
        yield base


HI = Prompt(messages=(Message("user", "hi"),), hits=[], tokens=1, exact=False)


def _collect(endpoint, prompt: Prompt = HI, max_tokens: int = 8, kinds: bool = False) -> list:
    async def run() -> list:
        try:
            return [(d.kind, d.text) if kinds else d.text async for d in endpoint.stream(prompt, max_tokens)]
        finally:
            await endpoint.aclose()

    return asyncio.run(run())


def _openai(url: str, model: str) -> OpenAIEndpoint:
    return OpenAIEndpoint(EndpointSettings(kind="openai", url=url, model=model), "test")


def test_quirky_openai_stream_is_tolerated(url: str) -> None:
    assert _collect(_openai(url, "azure")) == ["Hel", "lo"]


def test_reasoning_content_stays_apart(url: str) -> None:
    assert _collect(_openai(url, "deepseek"), kinds=True) == [("reasoning", "Hm."), ("content", "Yes.")]


@pytest.mark.parametrize(
    "model, kind", [("unauthorized", "transport"), ("refuses", "model"), ("garbage", "transport")]
)
def test_failures_are_classified(url: str, model: str, kind: str) -> None:
    with pytest.raises(LLMError) as info:
        _collect(_openai(url, model))
    assert info.value.kind == kind


def test_llmapi_cumulative_text_becomes_deltas(url: str) -> None:
    endpoint = TritonEndpoint(EndpointSettings(url=url, model="llmapi", triton_inputs="llmapi"), "test")
    assert _collect(endpoint) == ["The", " sky", " is blue"]


def test_error_event_is_a_model_error(url: str) -> None:
    with pytest.raises(LLMError, match="model exploded") as info:
        _collect(TritonEndpoint(EndpointSettings(url=url, model="broken"), "test"))
    assert info.value.kind == "model"


def test_keepalives_do_not_defeat_the_first_token_deadline(url: str) -> None:
    endpoint = TritonEndpoint(EndpointSettings(url=url, model="silent", first_token_timeout_s=1.0), "test")
    started = time.monotonic()
    with pytest.raises(LLMError, match="no text within 1s") as info:
        _collect(endpoint)
    assert info.value.kind == "timeout" and time.monotonic() - started < 2.5


def test_rotated_token_file_is_read_per_request(tmp_path) -> None:
    from services.llm.endpoints import BearerFromSettings

    token = tmp_path / "jwt"
    token.write_text("first\n")
    auth = BearerFromSettings(EndpointSettings(url="http://127.0.0.1:1", api_key_file=token))
    import httpx

    assert next(auth.auth_flow(httpx.Request("GET", "http://x"))).headers["Authorization"] == "Bearer first"
    token.write_text("second")
    assert next(auth.auth_flow(httpx.Request("GET", "http://x"))).headers["Authorization"] == "Bearer second"


def test_cloud_must_use_tls() -> None:
    from services.config import ConfigError

    with pytest.raises(ConfigError, match="must use https"):
        load_settings(llm={"cloud": {"url": "http://llm.example.com"}})
    assert load_settings(llm={"cloud": {"url": "https://llm.example.com"}}).llm.cloud is not None


def test_triton_models_do_not_inherit_gateway_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("DUALTRACK_GATEWAY__API_KEY", "secret")
    env = TritonServer(tmp_path, 1, 2, 3).environment()
    assert not any(k.startswith("DUALTRACK_") for k in env) and "LD_LIBRARY_PATH" in env


def test_measured_deadlines_follow_the_speed() -> None:
    from services.llm.pace import Pace

    fixed = Pace(EndpointSettings(url="http://127.0.0.1:1"))
    fixed.observe(1000, 100.0, 100, 20.0)
    assert fixed.first_token_timeout(4000) == 15.0  # fixed: the setting, whatever the speed
    slow = Pace(EndpointSettings(url="http://127.0.0.1:1", timeouts="measured", timeout_margin=3))
    assert slow.first_token_timeout(4000) == 15.0  # nothing measured yet: the floor
    slow.observe(1300, 100.0, 50, 10.0)  # 13 prompt tokens/s, 5 generated tokens/s (a 7B on 2 cores)
    assert slow.first_token_timeout(1300) == pytest.approx(300.0)
    assert slow.request_timeout(1300, 512) == pytest.approx(300.0 + 3 * 512 / 5)
    assert slow.first_token_timeout(10) == 15.0  # a short prompt keeps the floor


def test_measured_deadlines_count_the_requests_queued_ahead() -> None:
    from services.llm.pace import Pace

    pace = Pace(EndpointSettings(url="http://127.0.0.1:1", timeouts="measured", timeout_margin=2))
    pace.observe(1000, 10.0, 100, 10.0)  # 100 prompt tokens/s, 10 tokens/s, 20 s an answer
    pace.in_flight = 1  # this request alone
    alone = pace.first_token_timeout(1000)
    pace.in_flight = 3  # two answers ahead of it on a server that answers one at a time
    assert alone == pytest.approx(20.0) and pace.first_token_timeout(1000) == pytest.approx(2 * (10 + 40))
