"""Answering with routing and failover: the one object the gateway asks for answers.

Per request: the sensitivity router decides whether the cloud may see it; if so and
the circuit breaker allows, the cloud model answers -- and when it cannot (down,
failing, too slow to start), the local model answers the same question, with no
error to the user. Without a local model, the extractive answerer of the knowledge
base answers. Every outcome carries the route taken and why.

Each endpoint gets the prompt built for it (``compose`` with that endpoint's tokenizer),
so a local model with a smaller context is not sent the cloud's prompt. A reasoning
model's ``<think>`` is split from the answer here (:mod:`services.llm.reasoning`), capped
at ``max_reasoning_tokens``, and never taken for the answer: a model that only thinks, or
returns nothing, has failed this request -- the cloud then fails over like any failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from services.config import EndpointSettings, LLMSettings
from services.kb.classification import Classification
from services.kb.models import Answer, Citation, Hit
from services.llm.breaker import CircuitBreaker, Permit, State
from services.llm.conversation import AnswerMemory
from services.llm.endpoints import Endpoint, LLMError, endpoint
from services.llm.metrics import BREAKER_STATES, LLMMetrics
from services.llm.prompt import Prompt, build_prompt
from services.llm.reasoning import Delta, ThinkSplitter, UnterminatedReasoning
from services.llm.router import RouteDecision, SensitivityRouter
from services.llm.tokens import ApproxCounter, TokenCounter, counter_for

log = logging.getLogger(__name__)
Requested = Literal["auto", "local", "cloud"]
Compose = Callable[[TokenCounter], Prompt]
"""Builds the prompt for an endpoint's tokenizer (raises PromptTooLong)."""
CONTINUED = "\n\n[the cloud model stopped answering; the on-prem model answers below]\n\n"
CONTINUED_EXTRACTIVE = "\n\n[the cloud model stopped answering; passages from the knowledge base follow]\n\n"
WARM_UP = "Reply with one word: ready."


@dataclass
class Outcome:
    """How an answer was produced (filled while a stream runs)."""

    route: str = ""
    reason: str = ""
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    failover: str | None = None
    first_token_s: float | None = None
    prompt: Prompt | None = None
    """The prompt the answering model was sent (passages numbered as the answer cites them)."""
    citations: list[Citation] | None = None
    """Set when the extractive answerer answered: it cites only the passages it quotes."""
    reasoning: list[str] = field(default_factory=list)
    held_back: bool = False
    """The composed cloud prompt failed the outbound check: answered on the premises."""
    screened: bool = False
    """The composed cloud prompt passed the outbound check (not run when the cloud is down)."""

    def cloud_eligible(self, decision: RouteDecision) -> bool:
        """Whether this answer's inputs could have gone to the cloud (so a later turn quoting it
        may, too): only once the exact prompt passed the outbound check and the cloud gave the
        whole answer (an on-prem answer after a failover was composed from another prompt)."""
        return decision.target == "cloud" and self.screened and self.route == "cloud"


class AnswerService:
    def __init__(
        self, settings: LLMSettings, extractive: Callable[[str, Sequence[Hit]], Answer], metrics: LLMMetrics
    ) -> None:
        self.settings = settings
        self.router = SensitivityRouter(settings.routing)
        self.memory = AnswerMemory(settings.routing.conversation_memory)
        self.extractive = extractive
        self.metrics = metrics
        self.cloud: Endpoint | None = endpoint(settings.cloud, "cloud") if settings.cloud else None
        self.local: Endpoint | None = endpoint(settings.local, "local") if settings.local else None
        self.counters: dict[str, TokenCounter] = {
            name: counter_for(ep.settings.tokenizer)
            for name, ep in (("cloud", self.cloud), ("local", self.local))
            if ep is not None
        }
        self._warm_up: asyncio.Task[None] | None = None
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
        measured = [
            ep for ep in (self.cloud, self.local) if ep is not None and ep.settings.timeouts == "measured"
        ]
        if measured and self._warm_up is None:
            self._warm_up = asyncio.create_task(self._measure(measured), name="llm-warm-up")

    async def aclose(self) -> None:
        for task in (self._probe, self._warm_up):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._probe = self._warm_up = None
        for ep in (self.cloud, self.local):
            if ep is not None:
                await ep.aclose()

    def counter(self, target: str) -> TokenCounter:
        return self.counters.get(target) or ApproxCounter()

    async def _measure(self, endpoints: Sequence[Endpoint]) -> None:
        """Time a short request on each endpoint whose deadlines follow its speed."""
        for ep in endpoints:
            prompt = build_prompt(
                self.settings.system_prompt,
                WARM_UP,
                [],
                context_budget=64,
                max_tokens=self.settings.max_prompt_tokens,
                counter=self.counter(ep.name),
            )
            try:
                await self._timed(ep, prompt, 8)
                log.info(
                    "%s model speed: %.0f prompt tokens/s, %.1f generated tokens/s",
                    ep.name,
                    ep.pace.prompt_tps or 0,
                    ep.pace.generate_tps or 0,
                )
            except LLMError as exc:
                log.warning("%s model warm-up failed (%s): deadlines stay at their floors", ep.name, exc)

    async def _timed(self, ep: Endpoint, prompt: Prompt, max_tokens: int) -> None:
        started = time.perf_counter()
        first: float | None = None
        pieces = 0
        async with contextlib.aclosing(ep.stream(prompt, max_tokens)) as deltas:
            async for _ in deltas:
                pieces += 1
                if first is None:
                    first = time.perf_counter()
        if first is not None:
            ep.pace.observe(prompt.tokens, first - started, pieces - 1, time.perf_counter() - first)

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

    def decide(
        self,
        texts: Sequence[str],
        labels: Iterable[Classification],
        requested: Requested = "auto",
        *,
        vouched: bool = True,
        unlooked: str | None = None,
    ) -> RouteDecision:
        """Route on the question and turns (``texts``) and the labels of every chunk involved."""
        decision = self.router.decide(
            texts, labels, vouched=vouched, unlooked=unlooked, cloud_available=self.cloud is not None
        )
        if requested == "local" and decision.target == "cloud":
            decision = RouteDecision("local", "requested-local")
        self.metrics.decisions.labels(decision.target, decision.reason.split(":")[0]).inc()
        return decision

    # -- answering ------------------------------------------------------------------------

    def _cloud_allowed(self, decision: RouteDecision, outcome: Outcome) -> Permit | None:
        if decision.target != "cloud" or self.cloud is None:
            return None
        permit = self.breaker.allow()
        if permit is None:
            outcome.failover = "breaker-open"
            self.metrics.failovers.labels("breaker-open").inc()
        return permit

    def _failed(self, error: LLMError, outcome: Outcome, permit: Permit) -> None:
        self.breaker.record_failure(permit)
        outcome.failover = error.kind
        self.metrics.failovers.labels(error.kind).inc()
        log.warning("cloud failed (%s): %s; answering on-prem", error.kind, error)

    async def complete(
        self,
        compose: Compose,
        decision: RouteDecision,
        question: str,
        hits: Sequence[Hit],
        max_tokens: int,
        temperature: float | None = None,
    ) -> tuple[str, Outcome]:
        """The whole answer. The cloud is still read as a stream (so a silent cloud is detected
        at the first-token timeout, not the whole-request one) and a half-finished cloud answer
        is discarded, not mixed with the on-prem one. Reasoning is in ``outcome.reasoning``."""
        outcome = Outcome()
        parts: list[str] = []
        async for d in self._generate(
            compose, decision, question, hits, max_tokens, temperature, outcome, buffered=True
        ):
            if d.kind == "content":
                parts.append(d.text)
        return "".join(parts), outcome

    async def stream(
        self,
        compose: Compose,
        decision: RouteDecision,
        question: str,
        hits: Sequence[Hit],
        max_tokens: int,
        temperature: float | None,
        outcome: Outcome,
    ) -> AsyncIterator[Delta]:
        """Typed deltas; ``outcome`` says which model produced them (set before the first delta).

        Closing this generator early (the client went away) closes the upstream HTTP stream,
        which makes Triton cancel the request (see docs/llm.md for the ensemble caveat).
        """
        inner = self._generate(
            compose, decision, question, hits, max_tokens, temperature, outcome, buffered=False
        )
        try:
            async with contextlib.aclosing(inner) as deltas:
                async for delta in deltas:
                    yield delta
        except (GeneratorExit, asyncio.CancelledError):
            self.metrics.cancelled.inc()
            raise

    async def _answer(
        self, ep: Endpoint, prompt: Prompt, max_tokens: int, temperature: float | None, outcome: Outcome
    ) -> AsyncIterator[Delta]:
        """One endpoint's answer: think tags split, reasoning capped, an empty answer an error."""
        s: EndpointSettings = ep.settings
        counter = self.counter(ep.name)
        temperature = temperature if temperature is not None else self.settings.temperature
        cap = self.settings.max_reasoning_tokens
        budget = max_tokens + (cap if s.reasoning else 0)
        opened: bool | None = s.reasoning_opened
        if opened is None and counter.exact:
            opened = counter.opens_reasoning()  # the template says; without one nobody knows
        splitter = ThinkSplitter(opened=opened) if s.reasoning else None
        reasoning = answered = 0
        started = time.perf_counter()
        first: float | None = None
        pieces = 0

        def typed(raw: Delta) -> list[Delta]:
            return splitter.feed(raw.text) if splitter is not None and raw.kind == "content" else [raw]

        if s.timeouts == "measured" and self._warm_up is not None and not self._warm_up.done():
            # the model is busy with the warm-up, and its speed is being measured: wait for both
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._warm_up), s.request_timeout_s)
        async with contextlib.aclosing(ep.stream(prompt, budget, temperature)) as raw_deltas:
            async for raw in raw_deltas:
                pieces += 1
                first = first or time.perf_counter()
                for d in typed(raw):
                    if d.kind == "reasoning":
                        reasoning += counter.count(d.text)
                        if reasoning > cap:
                            raise LLMError(
                                "model",
                                f"the model reasoned past llm.max_reasoning_tokens={cap} without answering",
                            )
                    elif d.text.strip():
                        answered += 1
                    yield d
        if splitter is not None:
            try:
                rest = splitter.finish()
            except UnterminatedReasoning as exc:
                raise LLMError("model", str(exc)) from None
            for d in rest:
                answered += bool(d.text.strip())
                yield d
        if not answered:
            raise LLMError("model", "the model returned an empty answer")
        outcome.reasoning_tokens = reasoning
        if first is not None:
            ep.pace.observe(prompt.tokens, first - started, pieces - 1, time.perf_counter() - first)

    async def _generate(
        self,
        compose: Compose,
        decision: RouteDecision,
        question: str,
        hits: Sequence[Hit],
        max_tokens: int,
        temperature: float | None,
        outcome: Outcome,
        *,
        buffered: bool,
    ) -> AsyncIterator[Delta]:
        """Cloud when allowed and healthy, else on-prem, else extractive -- as typed deltas.

        ``buffered``: hold cloud deltas until the cloud finished, so a failure midway restarts
        cleanly on-prem; unbuffered (a live stream), the user keeps what was sent and the
        on-prem model answers after a visible note.
        """
        outcome.reason = decision.reason
        started = time.perf_counter()
        sent: list[Delta] = []
        cloud_prompt = None
        # the breaker is asked first: nothing is composed or scanned for a cloud that is down
        permit = self._cloud_allowed(decision, outcome)
        if permit is not None:
            try:
                prompt = compose(self.counter("cloud"))
                # the last gate: the exact prompt, system message and passages included
                held = await asyncio.to_thread(self.router.outbound, prompt)
            except BaseException:
                self.breaker.release(permit)
                raise
            if held is None:
                cloud_prompt, outcome.screened = prompt, True
            else:
                self.breaker.release(permit)  # a half-open trial that never reached the cloud
                outcome.reason, outcome.held_back = held, True
                self.metrics.decisions.labels("local", held.split(":")[0]).inc()
        if cloud_prompt is not None and permit is not None:
            assert self.cloud is not None
            settled = False  # the breaker heard how this attempt ended (a half-open trial must end)
            prompt = cloud_prompt
            try:
                for attempt in range(self.settings.transport_retries + 1):
                    held: list[Delta] = []
                    try:
                        # aclosing: the upstream HTTP stream closes here and now when we stop early
                        upstream = contextlib.aclosing(
                            self._answer(self.cloud, prompt, max_tokens, temperature, outcome)
                        )
                        async with upstream as deltas:
                            async for delta in deltas:
                                if not sent and not held:
                                    outcome.route, outcome.prompt = "cloud", prompt
                                    self._first(outcome, started)
                                if buffered:
                                    held.append(delta)
                                else:
                                    sent.append(delta)
                                    yield delta
                    except LLMError as exc:
                        if exc.kind == "transport" and not sent and attempt < self.settings.transport_retries:
                            continue
                        if exc.kind in ("model", "busy"):
                            # the cloud is fine (it refused this request, or we are out of
                            # connections): do not count it, but still answer on-prem
                            self.breaker.release(permit)
                            outcome.failover = exc.kind
                            self.metrics.failovers.labels(exc.kind).inc()
                            log.warning("cloud could not answer (%s): %s; answering on-prem", exc.kind, exc)
                        else:
                            self._failed(exc, outcome, permit)
                        settled = True
                        if sent:  # the user holds cloud output: the rest is not the cloud's alone
                            on_prem = self.local is not None
                            outcome.route = "cloud+local" if on_prem else "cloud+extractive"
                            if any(d.kind == "content" for d in sent):  # part of an answer
                                yield Delta("content", CONTINUED if on_prem else CONTINUED_EXTRACTIVE)
                        break
                    else:
                        self.breaker.record_success(permit)
                        settled = True
                        for delta in held:
                            yield delta
                        self._finish(outcome, sent or held, self.counter("cloud"))
                        return
            except Exception:
                if not settled:  # an unexpected failure is a cloud failure
                    self.breaker.record_failure(permit)
                    settled = True
                raise
            finally:
                if not settled:  # cancelled mid-attempt (client gone): free a half-open trial
                    self.breaker.release(permit)
        local: list[Delta] = []
        if self.local is not None:
            prompt = compose(self.counter("local"))
            answer = self._answer(self.local, prompt, max_tokens, temperature, outcome)
            async with contextlib.aclosing(answer) as deltas:
                async for delta in deltas:
                    if not local and not sent:
                        outcome.route = "local"
                        self._first(outcome, started)
                    if not local:
                        outcome.prompt = prompt
                    local.append(delta)
                    yield delta
            self._finish(outcome, sent + local, self.counter("local"))
            return
        answer_text = await asyncio.to_thread(self.extractive, question, hits)
        outcome.citations = answer_text.citations
        if not sent:
            outcome.route = "extractive"
            self._first(outcome, started)
        yield Delta("content", answer_text.text)
        self._finish(outcome, [Delta("content", answer_text.text)], ApproxCounter())

    def _first(self, outcome: Outcome, started: float) -> None:
        outcome.first_token_s = time.perf_counter() - started
        self.metrics.first_token.labels(outcome.route).observe(outcome.first_token_s)

    def _finish(self, outcome: Outcome, deltas: Sequence[Delta], counter: TokenCounter) -> None:
        answer = "".join(d.text for d in deltas if d.kind == "content")
        outcome.reasoning = [d.text for d in deltas if d.kind == "reasoning"]
        outcome.completion_tokens = counter.count(answer) + outcome.reasoning_tokens
        self.metrics.served.labels(outcome.route).inc()
        self.metrics.tokens.labels(outcome.route).inc(outcome.completion_tokens)
