"""``dualtrack bench answers``: answer quality and latency of a real model behind the gateway.

Over the sample corpus and the question set in ``benchmarks/answers.yaml`` (each question with
the fact its answer must contain and the document it comes from), for every question:

- the extractive answerer (the baseline, in the same run): fact hit, citation precision;
- the model through the gateway (``/v1/chat/completions``, streamed, ``dualtrack-local``):
  fact hit, citation precision (cited passages that contain the fact), route, time to first
  token, tokens per second;
- the same prompt sent straight to the model: the gateway's own share of the time to first
  token (retrieval reported apart). The model's prompt cache is flushed between the two.

The model is a GGUF file served here by llama.cpp (``--model``) or any OpenAI-compatible
server a site already runs (``--endpoint``). A small base model scores low: that is a fact
about the model; the harness is what a site runs with its own.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from rich.console import Console
from rich.table import Table

from dualtrack.bench import machine
from dualtrack.local import llama_python
from services.config import Settings, load_settings
from services.kb.models import Hit
from services.kb.service import KnowledgeBase
from services.llamacpp import DEFAULT_ALIAS, LlamaServer

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ROOT / "benchmarks" / "answers.yaml"
SAMPLES = ROOT / "docs" / "samples"
FLUSH = [{"role": "user", "content": "Name a colour."}]


@dataclass
class Case:
    question: str
    fact: re.Pattern[str]
    source: str


@dataclass
class Score:
    hits: int = 0
    cited: int = 0
    supported: int = 0
    sourced: int = 0
    ttft: list[float] = field(default_factory=list)
    tps: list[float] = field(default_factory=list)
    routes: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, case: Case, answer: str, citations: list[dict[str, Any]], texts: dict[str, str]) -> None:
        self.hits += bool(case.fact.search(answer))
        self.cited += len(citations)
        self.supported += sum(bool(case.fact.search(texts.get(c["chunk_id"], ""))) for c in citations)
        self.sourced += any(c["source"] == case.source for c in citations)

    def summary(self, n: int) -> dict[str, Any]:
        return {
            "fact_hit_rate": round(self.hits / n, 3),
            "citation_precision": round(self.supported / self.cited, 3) if self.cited else None,
            "citations": self.cited,
            "answers_citing_the_source": self.sourced,
            "ttft_p50_s": round(statistics.median(self.ttft), 3) if self.ttft else None,
            "tokens_per_s_p50": round(statistics.median(self.tps), 1) if self.tps else None,
            "routes": self.routes,
            "failed": len(self.failures),
            "failures": self.failures,
        }


def load_cases(path: Path = QUESTIONS) -> list[Case]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [Case(c["question"], re.compile(c["fact"], re.IGNORECASE), c["source"]) for c in raw]


@contextlib.contextmanager
def _serve(app: Any) -> Iterator[str]:
    with socket_port() as port:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        try:
            yield url
        finally:
            server.should_exit = True
            thread.join(timeout=15)


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    yield port


def _stream(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    """One streamed chat completion: text, final chunk, TTFT and generation speed."""
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    final: dict[str, Any] = {}
    timing = ""
    with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:300]}")
        timing = r.headers.get("server-timing", "")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"the model failed: {event['error']}")
            delta = (event.get("choices") or [{}])[0].get("delta") or {}
            text = delta.get("content") or delta.get("reasoning_content") or ""
            if text:
                first = first or time.perf_counter()
                pieces.append(text)
            final = event
    end = time.perf_counter()
    ttft = (first or end) - started
    tokens = (final.get("usage") or {}).get("completion_tokens") or len(pieces)
    search_ms = float(timing.split("dur=")[1]) if "dur=" in timing else 0.0
    return {
        "text": "".join(pieces),
        "final": final,
        "ttft": ttft,
        "tps": (tokens - 1) / (end - first) if first and end > first and tokens > 1 else None,
        "search_s": search_ms / 1000,
    }


def run_answers_bench(
    console: Console,
    model: Path | None,
    endpoint: str | None,
    endpoint_model: str,
    threads: int,
    out: Path | None,
) -> dict[str, Any]:
    cases = load_cases()
    work = Path(tempfile.mkdtemp(prefix="dualtrack-bench-answers-"))
    server: LlamaServer | None = None
    if model is not None:
        with socket_port() as port:
            server = LlamaServer(model, port, python=llama_python(), threads=threads, ctx=8192, workdir=work)
        with console.status(f"loading {model.name} in llama.cpp..."):
            server.start(timeout_s=600)
        endpoint, endpoint_model = server.url, DEFAULT_ALIAS
    if endpoint is None:
        raise ValueError("give --model PATH.gguf or --endpoint URL")
    key = secrets.token_urlsafe(24)
    local = {"kind": "openai", "url": endpoint, "model": endpoint_model, "timeouts": "measured"}
    if model is not None:
        local["tokenizer"] = str(model)
    settings: Settings = load_settings(
        milvus={"uri": str(work / "kb.db")}, gateway={"api_key": key}, llm={"local": local, "temperature": 0}
    )
    kb = KnowledgeBase(settings)
    try:
        kb.start()
        with console.status("ingesting the sample corpus..."):
            for path in sorted(p for p in SAMPLES.rglob("*") if p.is_file()):
                if path.suffix in (".md", ".txt", ".html", ".pdf", ".docx") and path.name != "README.md":
                    kb.ingestor.ingest_path(path, root=SAMPLES)
        result = _measure(console, cases, kb, settings, key, endpoint, endpoint_model)
    finally:
        if server is not None:
            server.stop()
    result |= {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": model.name if model is not None else endpoint,
        "questions": len(cases),
    }
    _report(console, result)
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _measure(
    console: Console,
    cases: list[Case],
    kb: KnowledgeBase,
    settings: Settings,
    key: str,
    endpoint: str,
    endpoint_model: str,
) -> dict[str, Any]:
    from services.gateway.app import create_app
    from services.llm.prompt import build_prompt
    from services.llm.tokens import counter_for

    extractive, gateway = Score(), Score()
    own: list[float] = []
    direct_ttft: list[float] = []
    counter = counter_for(settings.llm.local.tokenizer if settings.llm.local else None)
    headers = {"Authorization": f"Bearer {key}"}
    with _serve(create_app(settings, kb)) as url, httpx.Client(timeout=900) as client:
        for i, case in enumerate(cases, 1):
            console.print(f"[dim]{i}/{len(cases)} {case.question}[/]")
            hits: list[Hit] = kb.search(case.question)
            texts = {h.chunk.id: h.chunk.text for h in hits}
            answer = kb.answer(case.question, hits)
            cited = [{"chunk_id": c.chunk_id, "source": c.source} for c in answer.citations]
            extractive.add(case, answer.text, cited, texts)

            client.post(
                f"{endpoint}/v1/chat/completions",
                json={"model": endpoint_model, "messages": FLUSH, "max_tokens": 2},
            )
            body = {
                "model": "dualtrack-local",
                "messages": [{"role": "user", "content": case.question}],
                "stream": True,
            }
            try:
                via = _stream(client, f"{url}/v1/chat/completions", body, headers)
            except RuntimeError as exc:  # a failed answer is a result too: counted, not fatal
                gateway.failures.append(f"{case.question}: {exc}")
                console.print(f"[red]  failed: {exc}[/]")
                continue
            final = via["final"]
            gateway.add(case, via["text"], final.get("citations", []), texts)
            gateway.ttft.append(via["ttft"])
            if via["tps"]:
                gateway.tps.append(via["tps"])
            route = final.get("route", "?")
            gateway.routes[route] = gateway.routes.get(route, 0) + 1

            prompt = build_prompt(
                settings.llm.system_prompt,
                case.question,
                hits,
                context_budget=settings.llm.context_token_budget,
                max_tokens=settings.llm.max_prompt_tokens,
                counter=counter,
            )
            client.post(
                f"{endpoint}/v1/chat/completions",
                json={"model": endpoint_model, "messages": FLUSH, "max_tokens": 2},
            )
            direct = _stream(
                client,
                f"{endpoint}/v1/chat/completions",
                {
                    "model": endpoint_model,
                    "messages": prompt.wire(),
                    "stream": True,
                    "max_tokens": settings.llm.max_tokens,
                    "temperature": 0,
                },
                {},
            )
            direct_ttft.append(direct["ttft"])
            own.append(via["ttft"] - via["search_s"] - direct["ttft"])
    n = len(cases)
    model_ttft = statistics.median(direct_ttft)
    gateway_own = statistics.median(own)
    return {
        "extractive": extractive.summary(n),
        "model_through_gateway": gateway.summary(n),
        "model_direct_ttft_p50_s": round(model_ttft, 3),
        "gateway_own_ttft_p50_s": round(gateway_own, 4),
        "gateway_own_share_of_ttft": round(gateway_own / model_ttft, 4) if model_ttft else None,
    }


def _report(console: Console, result: dict[str, Any]) -> None:
    table = Table(title=f"answers: {result['questions']} questions, {result['model']}")
    for col in (
        "",
        "fact hit rate",
        "citation precision",
        "citations",
        "TTFT p50 s",
        "tokens/s p50",
        "routes",
    ):
        table.add_column(col)
    for name, key in (
        ("extractive (baseline)", "extractive"),
        ("model via gateway", "model_through_gateway"),
    ):
        s = result[key]
        table.add_row(
            name,
            f"{s['fact_hit_rate']:.2f}",
            "-" if s["citation_precision"] is None else f"{s['citation_precision']:.2f}",
            str(s["citations"]),
            "-" if s["ttft_p50_s"] is None else f"{s['ttft_p50_s']:.2f}",
            "-" if s["tokens_per_s_p50"] is None else f"{s['tokens_per_s_p50']:.1f}",
            json.dumps(s["routes"]) if s["routes"] else "-",
        )
    console.print(table)
    console.print(
        f"model TTFT straight to the server p50 {result['model_direct_ttft_p50_s']:.3f} s; the gateway's own "
        f"share (retrieval apart) p50 {result['gateway_own_ttft_p50_s'] * 1000:.1f} ms = "
        f"{(result['gateway_own_share_of_ttft'] or 0) * 100:.1f} % of it"
    )
