"""Clients for the two kinds of LLM endpoint: Triton's generate API and OpenAI-compatible servers.

Both take the prompt as chat messages (:class:`~services.llm.prompt.Prompt`): an
OpenAI-compatible server applies its model's chat template, and so do Triton's
preprocessing and LLM-API models (the ``messages`` input), from the tokenizer in the model
repository. Both yield typed pieces (:class:`~services.llm.reasoning.Delta`): a server
that separates reasoning (``reasoning_content``) keeps it apart; think tags inside the
text are split by the answering service.

Answers are always read as streams: a silent endpoint is given up at the first-token
deadline, a slow one at the whole-request deadline (neither moves with server
keep-alives). Both speak async httpx: a client
disconnect cancels the awaiting task, which closes the upstream HTTP stream, so the
model stops working on an answer nobody reads. Errors are classified for failover:

- ``transport`` / ``timeout`` -- the endpoint is failing (unreachable, dropped, 401/403
  from an ingress, 404, 429, 5xx, malformed events): counts against the cloud;
- ``model`` -- it refused *this* request (400/413/422 or an error event);
- ``busy`` -- this gateway has no free connection to it.

The bearer token is read per request, so a rotated JWT file needs no restart.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Literal, Protocol

import httpx

from services.audit import egress
from services.config import EndpointSettings
from services.kb.store import display_uri
from services.llm.pace import Pace
from services.llm.prompt import Prompt
from services.llm.reasoning import Delta

ErrorKind = Literal["transport", "timeout", "model", "busy"]
LIMITS = httpx.Limits(max_connections=512, max_keepalive_connections=64)
REQUEST_ERRORS = (400, 413, 422)


class LLMError(RuntimeError):
    def __init__(self, kind: ErrorKind, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind, self.status = kind, status


class Endpoint(Protocol):
    name: str

    settings: EndpointSettings
    pace: Pace

    def stream(
        self, prompt: Prompt, max_tokens: int, temperature: float | None = None
    ) -> AsyncIterator[Delta]: ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


def _timeout(s: EndpointSettings, read: float) -> httpx.Timeout:
    # read = the longest silence between bytes: time to first token, then between tokens
    return httpx.Timeout(connect=s.connect_timeout_s, read=read, write=10.0, pool=5.0)


def _classify(exc: Exception) -> LLMError:
    if isinstance(exc, LLMError):
        return exc
    if isinstance(exc, httpx.PoolTimeout):
        return LLMError("busy", "no free connection to the endpoint in this gateway")
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
    return LLMError("model" if status in REQUEST_ERRORS else "transport", f"HTTP {status}: {message}", status)


def _event(data: str) -> dict:
    try:
        event = json.loads(data)
    except ValueError:
        raise LLMError("transport", f"malformed event from the model: {data[:120]!r}") from None
    if not isinstance(event, dict):
        raise LLMError("transport", f"unexpected event from the model: {data[:120]!r}")
    if "error" in event:
        raise LLMError("model", f"model error: {event['error']}")
    return event


class BearerFromSettings(httpx.Auth):
    """Reads the token for every request (a rotated JWT file is picked up); never logged."""

    def __init__(self, settings: EndpointSettings) -> None:
        self.settings = settings

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self.settings.bearer()
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        yield request


class _Base:
    def __init__(self, settings: EndpointSettings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.pace = Pace(settings)
        self.client = httpx.AsyncClient(
            base_url=settings.url.rstrip("/"),
            timeout=_timeout(settings, settings.first_token_timeout_s),
            auth=BearerFromSettings(settings),
            event_hooks={"request": [egress.count_request]},
            limits=LIMITS,
            transport=httpx.AsyncHTTPTransport(retries=0, limits=LIMITS),
        )

    def _stream(
        self, prompt: Prompt, max_tokens: int, temperature: float | None = None
    ) -> AsyncIterator[Delta]:
        raise NotImplementedError

    async def stream(
        self, prompt: Prompt, max_tokens: int, temperature: float | None = None
    ) -> AsyncIterator[Delta]:
        """The answer as typed deltas; counted in flight (the measured deadlines see the queue)
        and in the request's audit record (what was sent where, never the text)."""
        leaves = self.name == "cloud"
        with (
            self._counted(),
            egress.calling(self.name, display_uri(self.settings.url), prompt.tokens, leaves),
        ):
            async with contextlib.aclosing(self._stream(prompt, max_tokens, temperature)) as deltas:  # type: ignore[type-var]
                async for delta in deltas:
                    yield delta

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        self.pace.in_flight += 1
        try:
            yield
        finally:
            self.pace.in_flight -= 1

    def _deadlines(self, prompt: Prompt, max_tokens: int) -> tuple[float, float]:
        now = time.monotonic()
        self._first_s = self.pace.first_token_timeout(prompt.tokens)
        self._last_s = self.pace.request_timeout(prompt.tokens, max_tokens)
        return now + self._first_s, now + self._last_s

    def _read_timeout(self, prompt: Prompt) -> httpx.Timeout:
        return _timeout(self.settings, self.pace.first_token_timeout(prompt.tokens))

    def _check(self, first: float, last: float, produced: bool) -> None:
        now = time.monotonic()
        if not produced and now > first:
            raise LLMError("timeout", f"no text within {self._first_s:.0f}s")
        if now > last:
            raise LLMError("timeout", f"generation exceeded {self._last_s:.0f}s")

    async def aclose(self) -> None:
        await self.client.aclose()


class TritonEndpoint(_Base):
    """``POST /v2/models/<model>/generate_stream`` (SSE): chat messages in, text out.

    ``triton_inputs = "ensemble"``: the inflight-batching ensemble (messages, max_tokens,
    stream; each event carries new text). ``"llmapi"``: TensorRT-LLM's LLM-API model
    (messages, streaming, sampling_param_*; each event carries the whole text so far).
    ``messages`` is the conversation as a JSON string; the model applies its chat template.
    """

    def _body(self, prompt: Prompt, max_tokens: int, temperature: float | None, stream: bool) -> dict:
        messages = json.dumps(prompt.wire(), ensure_ascii=False)
        if self.settings.triton_inputs == "llmapi":
            body: dict = {
                "messages": [messages],
                "streaming": [stream],
                "sampling_param_max_tokens": [max_tokens],
            }
            if temperature is not None:
                body["sampling_param_temperature"] = [temperature]
            return body
        body = {"messages": messages, "max_tokens": max_tokens, "stream": stream}
        if temperature is not None:
            body["temperature"] = temperature
        return body

    @staticmethod
    def _text(event: dict) -> str:
        text = event.get("text_output")
        if isinstance(text, list):
            text = text[0] if text else ""
        return text if isinstance(text, str) else ""

    async def _stream(
        self, prompt: Prompt, max_tokens: int, temperature: float | None = None
    ) -> AsyncIterator[Delta]:
        path = f"/v2/models/{self.settings.model}/generate_stream"
        cumulative = self.settings.triton_inputs == "llmapi"
        try:
            async with self.client.stream(
                "POST",
                path,
                json=self._body(prompt, max_tokens, temperature, True),
                timeout=self._read_timeout(prompt),
            ) as r:
                if r.status_code != 200:
                    raise _http_error(r.status_code, (await r.aread()).decode(errors="replace"))
                first, last = self._deadlines(prompt, max_tokens)
                so_far = ""
                async for line in r.aiter_lines():
                    self._check(first, last, bool(so_far))
                    if not line.startswith("data:"):
                        continue
                    text = self._text(_event(line[5:]))
                    if not text:
                        continue
                    if cumulative:
                        delta = text[len(so_far) :] if text.startswith(so_far) else text
                        so_far = text
                    else:
                        delta, so_far = text, so_far + text
                    if delta:
                        yield Delta("content", delta)
        except httpx.HTTPError as exc:
            raise _classify(exc) from None

    async def ready(self) -> bool:
        try:
            r = await self.client.get(f"/v2/models/{self.settings.model}/ready", timeout=1.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200


class OpenAIEndpoint(_Base):
    """An OpenAI-compatible ``/v1/chat/completions`` (llama.cpp, vLLM, Ollama, TGI, DeepSeek's API).

    Reasoning sent apart (``reasoning_content``, or vLLM's ``reasoning``) stays apart.
    """

    def _body(self, prompt: Prompt, max_tokens: int, temperature: float | None, stream: bool) -> dict:
        body: dict = {
            "model": self.settings.model,
            "messages": prompt.wire(),
            "max_tokens": max_tokens,
            "stream": stream,
        }
        if temperature is not None:
            body["temperature"] = temperature
        return body

    async def _stream(
        self, prompt: Prompt, max_tokens: int, temperature: float | None = None
    ) -> AsyncIterator[Delta]:
        try:
            async with self.client.stream(
                "POST",
                "/v1/chat/completions",
                json=self._body(prompt, max_tokens, temperature, True),
                timeout=self._read_timeout(prompt),
            ) as r:
                if r.status_code != 200:
                    raise _http_error(r.status_code, (await r.aread()).decode(errors="replace"))
                first, last = self._deadlines(prompt, max_tokens)
                produced = False
                async for line in r.aiter_lines():
                    self._check(first, last, produced)
                    data = line[5:].strip() if line.startswith("data:") else ""
                    if not data or data == "[DONE]":
                        continue
                    choices = _event(data).get("choices") or []  # some servers open with an empty list
                    first_choice = choices[0] if isinstance(choices, list) and choices else {}
                    delta = (first_choice or {}).get("delta") or {}
                    for kind, key in (
                        ("reasoning", "reasoning_content"),
                        ("reasoning", "reasoning"),
                        ("content", "content"),
                    ):
                        text = delta.get(key) if isinstance(delta, dict) else None
                        if isinstance(text, str) and text:
                            produced = True
                            yield Delta(kind, text)
        except httpx.HTTPError as exc:
            raise _classify(exc) from None

    async def ready(self) -> bool:
        try:
            return (await self.client.get("/v1/models", timeout=1.0)).status_code == 200
        except httpx.HTTPError:
            return False


def endpoint(settings: EndpointSettings, name: str) -> Endpoint:
    return TritonEndpoint(settings, name) if settings.kind == "triton" else OpenAIEndpoint(settings, name)
