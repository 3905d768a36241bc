"""Answering with routing and failover: the one object the gateway asks for answers.

Per request: the sensitivity router decides whether the cloud may see it; if so and
the circuit breaker allows, the cloud model answers -- and when it cannot (down,
failing, too slow to start), the local model answers the same prompt, with no
error to the user. Without a local model, the extractive answerer of the knowledge
base answers. Every outcome carries the route taken and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from services.config import LLMSettings
from services.kb.models import Answer, Citation, Hit
from services.llm.breaker import CircuitBreaker, State
from services.llm.endpoints import Endpoint, LLMError, endpoint
from services.llm.metrics import BREAKER_STATES, LLMMetrics
from services.llm.prompt import Prompt
from services.llm.router import RouteDecision, SensitivityRouter

log = logging.getLogger(__name__)
Requested = Literal["auto", "local", "cloud"]
CONTINUED = "\n\n[the cloud model stopped answering; the on-prem model answers below]\n\n"


@dataclass
class Outcome:
    """How an answer was produced (filled while a stream runs)."""

    route: str = ""
    reason: str = ""
    completion_tokens: int = 0
    failover: str | None = None
    first_token_s: float | None = None
    citations: list[Citation] | None = None
    """Set when the extractive answerer answered: it cites only the passages it quotes."""


class AnswerService:
    def __init__(
        self, settings: LLMSettings, extractive: Callable[[str, Sequence[Hit]], Answer], metrics: LLMMetrics
    ) -> None:
        self.settings = settings
        self.router = SensitivityRouter(settings.routing)
        self.extractive = extractive
        self.metrics = metrics
        self.cloud: Endpoint | None = endpoint(settings.cloud, "cloud") if settings.cloud else None
        self.local: Endpoint | None = endpoint(settings.local, "local") if settings.local else None
        self.breaker = CircuitBreaker(
            settings.breaker.failure_threshold,
            settings.breaker.reset_timeout_s,
            on_change=self._breaker_changed,
        )
        self._probe: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def _breaker_changed(self, state: State) -> None:
        self.metrics.breaker.set(BREAKER_STATES[state])
        log.warning("cloud circuit breaker -> %s", state)

    async def start(self) -> None:
        if self.cloud is not None and self._probe is None:
            self._probe = asyncio.create_task(self._probe_cloud(), name="cloud-health-probe")

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        for ep in (self.cloud, self.local):
            if ep is not None:
                await ep.aclose()

    async def _probe_cloud(self) -> None:
        """While the breaker is open, watch the cloud's readiness to bring traffic back early."""
        assert self.cloud is not None
        while True:
            await asyncio.sleep(self.settings.breaker.probe_interval_s)
            if self.breaker.state == "open" and await self.cloud.ready():
                self.breaker.probe_succeeded()

    # -- routing --------------------------------------------------------------------------

    @property
    def models(self) -> dict[str, str]:
        """OpenAI ``model`` names the gateway accepts -> what each means."""
        return {
            "dualtrack": "RAG; the router picks cloud or on-prem per request",
            "dualtrack-local": "RAG; always the on-prem model",
            "dualtrack-cloud": "RAG; the cloud model when the router allows (never for sensitive requests)",
        }

    def decide(self, question: str, hits: Sequence[Hit], requested: Requested = "auto") -> RouteDecision:
        decision = self.router.decide(question, hits, cloud_available=self.cloud is not None)
        if requested == "local" and decision.target == "cloud":
            decision = RouteDecision("local", "requested-local")
        self.metrics.decisions.labels(decision.target, decision.reason.split(":")[0]).inc()
        return decision

    # -- answering ------------------------------------------------------------------------

    def _cloud_allowed(self, decision: RouteDecision, outcome: Outcome) -> bool:
        if decision.target != "cloud" or self.cloud is None:
            return False
        if not self.breaker.allow():
            outcome.failover = "breaker-open"
            self.metrics.failovers.labels("breaker-open").inc()
            return False
        return True

    def _failed(self, error: LLMError, outcome: Outcome) -> None:
        self.breaker.record_failure()
        outcome.failover = error.kind
        self.metrics.failovers.labels(error.kind).inc()
        log.warning("cloud failed (%s): %s; answering on-prem", error.kind, error)

    async def complete(
        self,
        prompt: Prompt,
        decision: RouteDecision,
        question: str,
        hits: Sequence[Hit],
        max_tokens: int,
        temperature: float | None = None,
    ) -> tuple[str, Outcome]:
        """The whole answer. The cloud is still read as a stream (so a silent cloud is detected
        at the first-token timeout, not the whole-request one) and a half-finished cloud answer
        is discarded, not mixed with the on-prem one."""
        outcome = Outcome()
        parts = [
            d
            async for d in self._generate(
                prompt, decision, question, hits, max_tokens, temperature, outcome, buffered=True
            )
        ]
        return "".join(parts), outcome

    async def stream(
        self,
        prompt: Prompt,
        decision: RouteDecision,
        question: str,
        hits: Sequence[Hit],
        max_tokens: int,
        temperature: float | None,
        outcome: Outcome,
    ) -> AsyncIterator[str]:
        """Text deltas; ``outcome`` says which model produced them (set before the first delta).

        Closing this generator early (the client went away) closes the upstream HTTP stream,
        which makes Triton cancel the request (see docs/llm.md for the ensemble caveat).
        """
        inner = self._generate(
            prompt, decision, question, hits, max_tokens, temperature, outcome, buffered=False
        )
        try:
            async with contextlib.aclosing(inner) as deltas:
                async for delta in deltas:
                    yield delta
        except (GeneratorExit, asyncio.CancelledError):
            self.metrics.cancelled.inc()
            raise

    async def _generate(
        self,
        prompt: Prompt,
        decision: RouteDecision,
        question: str,
        hits: Sequence[Hit],
        max_tokens: int,
        temperature: float | None,
        outcome: Outcome,
        *,
        buffered: bool,
    ) -> AsyncIterator[str]:
        """Cloud when allowed and healthy, else on-prem, else extractive -- as deltas.

        ``buffered``: hold cloud deltas until the cloud finished, so a failure midway restarts
        cleanly on-prem; unbuffered (a live stream), the user keeps what was sent and the
        on-prem model answers after a visible note.
        """
        outcome.reason = decision.reason
        started = time.perf_counter()
        sent = 0
        if self._cloud_allowed(decision, outcome):
            assert self.cloud is not None
            settled = False  # the breaker heard how this attempt ended (a half-open trial must end)
            try:
                for attempt in range(self.settings.transport_retries + 1):
                    held: list[str] = []
                    try:
                        # aclosing: the upstream HTTP stream closes here and now when we stop early
                        upstream = contextlib.aclosing(
                            self.cloud.stream(prompt.text, max_tokens, temperature)
                        )
                        async with upstream as deltas:
                            async for delta in deltas:
                                if sent + len(held) == 0:
                                    outcome.route = "cloud"
                                    self._first(outcome, started)
                                if buffered:
                                    held.append(delta)
                                else:
                                    sent += 1
                                    yield delta
                    except LLMError as exc:
                        if (
                            exc.kind == "transport"
                            and sent == 0
                            and attempt < self.settings.transport_retries
                        ):
                            continue
                        if exc.kind in ("model", "busy"):
                            # the cloud is fine (it refused this request, or we are out of
                            # connections): do not count it, but still answer on-prem
                            self.breaker.release()
                            outcome.failover = exc.kind
                            self.metrics.failovers.labels(exc.kind).inc()
                        else:
                            self._failed(exc, outcome)
                        settled = True
                        if sent:  # the user already has part of an answer
                            outcome.route = "cloud+local"
                            yield CONTINUED
                        break
                    else:
                        self.breaker.record_success()
                        settled = True
                        for delta in held:
                            yield delta
                        self._finish(outcome, sent + len(held))
                        return
            except Exception:
                if not settled:  # an unexpected failure is a cloud failure
                    self.breaker.record_failure()
                    settled = True
                raise
            finally:
                if not settled:  # cancelled mid-attempt (client gone): free a half-open trial
                    self.breaker.release()
        local_sent = 0
        if self.local is not None:
            async with contextlib.aclosing(self.local.stream(prompt.text, max_tokens, temperature)) as deltas:
                async for delta in deltas:
                    if local_sent == 0 and sent == 0:
                        outcome.route = "local"
                        self._first(outcome, started)
                    local_sent += 1
                    yield delta
        else:
            answer = await asyncio.to_thread(self.extractive, question, hits)
            outcome.citations = answer.citations
            if sent == 0:
                outcome.route = "extractive"
                self._first(outcome, started)
            yield answer.text
        self._finish(outcome, sent + local_sent)

    def _first(self, outcome: Outcome, started: float) -> None:
        outcome.first_token_s = time.perf_counter() - started
        self.metrics.first_token.labels(outcome.route).observe(outcome.first_token_s)

    def _finish(self, outcome: Outcome, tokens: int) -> None:
        outcome.completion_tokens = tokens
        self.metrics.served.labels(outcome.route).inc()
        self.metrics.tokens.labels(outcome.route).inc(tokens)
