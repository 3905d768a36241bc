"""Clients for the two kinds of LLM endpoint: Triton's generate API and OpenAI-compatible servers.

Answers are always read as streams (a silent endpoint is noticed at the first-token
timeout, a slow one at the whole-request deadline); ``generate`` is the one-shot call.
Both speak async httpx: a client disconnect cancels the awaiting task, which closes the
upstream HTTP stream, so the model stops working on an answer nobody reads. Errors are
classified for the failover logic: ``transport`` (cannot reach it, connection dropped,
5xx) and ``timeout`` count against the cloud and fall back; ``model`` (a 4xx with the
model's own message, e.g. a prompt it refuses) is the caller's problem and is returned.
Connection failures before anything was sent are retried a bounded number of times.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

import httpx

from services.config import EndpointSettings

ErrorKind = Literal["transport", "timeout", "model"]


class LLMError(RuntimeError):
    def __init__(self, kind: ErrorKind, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind, self.status = kind, status


@dataclass(frozen=True)
class Generation:
    text: str
    completion_tokens: int


class Endpoint(Protocol):
    name: str

    async def generate(
        self, prompt: str, max_tokens: int, temperature: float | None = None
    ) -> Generation: ...

    def stream(
        self, prompt: str, max_tokens: int, temperature: float | None = None
    ) -> AsyncIterator[str]: ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


def _timeout(s: EndpointSettings) -> httpx.Timeout:
    # read = the longest silence between bytes: time to first token, then between tokens
    return httpx.Timeout(connect=s.connect_timeout_s, read=s.first_token_timeout_s, write=10.0, pool=5.0)


def _classify(exc: Exception) -> LLMError:
    if isinstance(exc, LLMError):
        return exc
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return LLMError("timeout", f"no answer in time ({type(exc).__name__})")
    return LLMError("transport", f"{type(exc).__name__}: {exc}")


def _http_error(status: int, body: str) -> LLMError:
    try:
        detail = json.loads(body)
        message = (
            detail.get("error") if isinstance(detail.get("error"), str) else json.dumps(detail.get("error"))
        )
    except (ValueError, AttributeError):
        message = body[:500]
    kind: ErrorKind = "model" if 400 <= status < 500 and status not in (404, 408, 429) else "transport"
    return LLMError(kind, f"HTTP {status}: {message}", status)


class _Base:
    def __init__(self, settings: EndpointSettings, name: str) -> None:
        self.settings = settings
        self.name = name
        headers = {"Authorization": f"Bearer {token}"} if (token := settings.bearer()) else {}
        self.client = httpx.AsyncClient(
            base_url=settings.url.rstrip("/"),
            timeout=_timeout(settings),
            headers=headers,
            transport=httpx.AsyncHTTPTransport(retries=0),
        )

    async def aclose(self) -> None:
        await self.client.aclose()


class TritonEndpoint(_Base):
    """``POST /v2/models/<model>/generate`` and ``generate_stream`` (SSE), text in, text out."""

    def _body(self, prompt: str, max_tokens: int, temperature: float | None, stream: bool) -> dict:
        body: dict = {"text_input": prompt, "max_tokens": max_tokens, "stream": stream}
        if temperature is not None:
            body["temperature"] = temperature
        return body

    async def generate(self, prompt: str, max_tokens: int, temperature: float | None = None) -> Generation:
        path = f"/v2/models/{self.settings.model}/generate"
        try:
            r = await self.client.post(
                path,
                json=self._body(prompt, max_tokens, temperature, False),
                timeout=httpx.Timeout(
                    self.settings.request_timeout_s, connect=self.settings.connect_timeout_s
                ),
            )
        except httpx.HTTPError as exc:
            raise _classify(exc) from None
        if r.status_code != 200:
            raise _http_error(r.status_code, r.text)
        text = r.json().get("text_output", "")
        return Generation(text=text, completion_tokens=max(1, len(text.split())) if text else 0)

    async def stream(
        self, prompt: str, max_tokens: int, temperature: float | None = None
    ) -> AsyncIterator[str]:
        path = f"/v2/models/{self.settings.model}/generate_stream"
        try:
            async with self.client.stream(
                "POST", path, json=self._body(prompt, max_tokens, temperature, True)
            ) as r:
                if r.status_code != 200:
                    raise _http_error(r.status_code, (await r.aread()).decode(errors="replace"))
                deadline = time.monotonic() + self.settings.request_timeout_s
                async for line in r.aiter_lines():
                    if time.monotonic() > deadline:
                        raise LLMError(
                            "timeout", f"generation exceeded {self.settings.request_timeout_s:.0f}s"
                        )
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        raise LLMError("model", f"model error: {event['error']}")
                    if event.get("text_output"):
                        yield event["text_output"]
        except httpx.HTTPError as exc:
            raise _classify(exc) from None

    async def ready(self) -> bool:
        try:
            r = await self.client.get(f"/v2/models/{self.settings.model}/ready", timeout=1.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200


class OpenAIEndpoint(_Base):
    """An OpenAI-compatible ``/v1/chat/completions`` (vLLM, llama.cpp, Ollama, TGI...)."""

    def _body(self, prompt: str, max_tokens: int, temperature: float | None, stream: bool) -> dict:
        body: dict = {
            "model": self.settings.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
        if temperature is not None:
            body["temperature"] = temperature
        return body

    async def generate(self, prompt: str, max_tokens: int, temperature: float | None = None) -> Generation:
        try:
            r = await self.client.post(
                "/v1/chat/completions",
                json=self._body(prompt, max_tokens, temperature, False),
                timeout=httpx.Timeout(
                    self.settings.request_timeout_s, connect=self.settings.connect_timeout_s
                ),
            )
        except httpx.HTTPError as exc:
            raise _classify(exc) from None
        if r.status_code != 200:
            raise _http_error(r.status_code, r.text)
        data = r.json()
        text = data["choices"][0]["message"].get("content") or ""
        return Generation(text=text, completion_tokens=int(data.get("usage", {}).get("completion_tokens", 0)))

    async def stream(
        self, prompt: str, max_tokens: int, temperature: float | None = None
    ) -> AsyncIterator[str]:
        try:
            async with self.client.stream(
                "POST", "/v1/chat/completions", json=self._body(prompt, max_tokens, temperature, True)
            ) as r:
                if r.status_code != 200:
                    raise _http_error(r.status_code, (await r.aread()).decode(errors="replace"))
                deadline = time.monotonic() + self.settings.request_timeout_s
                async for line in r.aiter_lines():
                    if time.monotonic() > deadline:
                        raise LLMError(
                            "timeout", f"generation exceeded {self.settings.request_timeout_s:.0f}s"
                        )
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    delta = json.loads(line[5:])["choices"][0].get("delta", {}).get("content")
                    if delta:
                        yield delta
        except httpx.HTTPError as exc:
            raise _classify(exc) from None

    async def ready(self) -> bool:
        try:
            return (await self.client.get("/v1/models", timeout=1.0)).status_code == 200
        except httpx.HTTPError:
            return False


def endpoint(settings: EndpointSettings, name: str) -> Endpoint:
    return TritonEndpoint(settings, name) if settings.kind == "triton" else OpenAIEndpoint(settings, name)
