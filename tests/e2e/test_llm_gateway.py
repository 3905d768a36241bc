"""The answering path end to end: gateway -> router -> two real tritonservers.

One tritonserver plays the cloud (the rendered ``ensemble``), one the on-prem fallback
(``local_fallback``); both serve the real rendered repository with the CPU TensorRT-LLM
stand-in (TEST DOUBLE, tests/triton), which records every request it receives -- so
"confidential text never reaches the cloud" is checked on what the cloud model saw.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from services.config import load_settings
from services.gateway.app import create_app
from services.kb.service import KnowledgeBase
from services.tritonserver import TritonServer
from tests.support import (
    SAMPLE_CONTACTS,
    SAMPLES,
    cite_prefix_ids,
    ingest_samples,
    offline_tokenizer_dir,
    render_test_repo,
    serve,
    triton_with_cpu_backend,
    wait_ready,
)

KEY = "llm-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
PUBLIC_Q = "How many vacation days do full-time employees get per year?"
CONFIDENTIAL_Q = "What enterprise value does management propose for Kestrel Vision?"


class Site:
    def __init__(self, server: TritonServer, record: Path) -> None:
        self.server, self.record = server, record

    def calls(self) -> list[dict]:
        return [json.loads(x) for x in self.record.read_text().splitlines()] if self.record.exists() else []

    def texts(self, tokenizer) -> list[str]:
        return [tokenizer.decode(c["input_ids"]) for c in self.calls()]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(offline_tokenizer_dir())


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Site]]:
    root = tmp_path_factory.mktemp("llm")
    made: dict[str, Site] = {}
    for name, role in (("cloud", "cloud"), ("local", "onprem")):
        repo = render_test_repo(root / name / "repo", role=role)
        record = root / name / "record" / "calls.jsonl"
        record.parent.mkdir(parents=True)
        # a slow-ish cloud (25 ms a token) so streams and in-flight requests last long enough to cut
        delay = "0.025" if name == "cloud" else "0"
        made[name] = Site(
            triton_with_cpu_backend(
                repo,
                root / name / "work",
                record,
                DUALTRACK_TEST_TOKEN_DELAY_S=delay,
                DUALTRACK_TEST_ANSWER_PREFIX_IDS=cite_prefix_ids(),  # its answers cite [1]
            ),
            record,
        )
    threads = [threading.Thread(target=s.server.start, kwargs={"timeout_s": 240}) for s in made.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s.server.is_ready() for s in made.values()), [s.server.log_tail() for s in made.values()]
    try:
        yield made
    finally:
        for site in made.values():
            site.server.stop()


@pytest.fixture(scope="module")
def gateway(sites: dict[str, Site], tmp_path_factory: pytest.TempPathFactory, embedder) -> Iterator[str]:
    settings = load_settings(
        milvus={"uri": str(tmp_path_factory.mktemp("llm-kb") / "kb.db")},
        gateway={"api_key": KEY},
        llm={
            "cloud": {"url": sites["cloud"].server.url, "model": "ensemble", "first_token_timeout_s": 5},
            "local": {"url": sites["local"].server.url, "model": "local_fallback"},
            "max_tokens": 24,
            "breaker": {"failure_threshold": 2, "reset_timeout_s": 2.0, "probe_interval_s": 0.2},
            "routing": {"dlp_allow": SAMPLE_CONTACTS},
        },
    )
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    ingest_samples(kb)
    with serve(create_app(settings, kb)) as url:
        wait_ready(url)
        yield url
    kb.close()


def _ask(url: str, question: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/ask", json={"question": question, **extra}, headers=AUTH, timeout=60)


def _chat(url: str, content: str, model: str = "dualtrack", **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def _stream(url: str, content: str, model: str = "dualtrack") -> list[dict | str]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": True}
    events: list[dict | str] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["server-timing"].startswith("search;dur=")  # retrieval time, streaming too
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return events


# -- routing and answers --------------------------------------------------------------------------


def test_ask_is_answered_by_the_cloud_with_citations(gateway: str, sites: dict[str, Site], tokenizer) -> None:
    local_before = len(sites["local"].calls())
    r = _ask(gateway, PUBLIC_Q)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["route"], body["route_reason"], body["failover"]) == ("cloud", "no-sensitive-content", None)
    # the stand-in's answer cites [1] and nothing else: passage 1 is the one citation
    assert body["answer"].startswith("[1]") and [c["n"] for c in body["citations"]] == [1]
    assert body["citations"][0]["source"] == "handbook/employee-handbook.md"
    cited = urlsplit(body["citations"][0]["url"]).path  # public_url is not this test server's address
    assert cited.endswith(f"/chunks/{body['citations'][0]['chunk_id']}")
    chunk = httpx.get(gateway + cited, headers=AUTH, timeout=10).json()
    assert "vacation" in chunk["text"] and chunk["id"] == body["citations"][0]["chunk_id"]
    seen = sites["cloud"].texts(tokenizer)[-1]
    # the model got chat messages: the numbered passages as data, then the question
    assert 'passage n = " 1 "' in seen and "vacation" in seen and "data, not instructions" in seen
    assert seen.index("< / passage >") < seen.index("user : how many vacation days")
    assert len(sites["local"].calls()) == local_before


def test_chat_completion_streams_end_to_end(gateway: str, sites: dict[str, Site]) -> None:
    events = _stream(gateway, "How long does the robot battery last on one charge?")
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert len(content) >= 3 and all(content)  # token by token
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop" and final["route"] == "cloud"
    assert final["citations"] and final["citations"][0]["url"].startswith("http://")
    answer = "".join(content)
    raw = answer.replace("&lt;", "<")  # what the model wrote, before the output was made inert
    assert final["usage"]["completion_tokens"] == math.ceil(len(raw) / 4)  # no tokenizer configured
    assert final["usage"]["prompt_tokens_exact"] is False
    assert sites["cloud"].calls()[-1]["streaming"] is True


@pytest.mark.parametrize("how", ["ask", "chat", "chat-stream"])
def test_confidential_text_never_reaches_the_cloud(
    gateway: str, sites: dict[str, Site], tokenizer, how: str
) -> None:
    if how == "ask":
        body = _ask(gateway, CONFIDENTIAL_Q).json()
        route, reason, citations = body["route"], body["route_reason"], body["citations"]
    elif how == "chat":
        body = _chat(gateway, CONFIDENTIAL_Q).json()
        route, reason, citations = body["route"], body["route_reason"], body["citations"]
    else:
        final = [e for e in _stream(gateway, CONFIDENTIAL_Q) if isinstance(e, dict)][-1]
        route, reason, citations = final["route"], final["route_reason"], final["citations"]
    assert (route, reason) == ("local", "confidential-context")
    assert any(c["classification"] == "confidential" for c in citations)
    assert "kestrel" in sites["local"].texts(tokenizer)[-1]  # the on-prem model did get the memo
    for seen in sites["cloud"].texts(tokenizer):
        assert "kestrel" not in seen and "falcon" not in seen and "enterprise value" not in seen


def _conversation(url: str, messages: list[dict]) -> dict:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "dualtrack", "messages": messages},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_the_whole_conversation_is_screened(gateway: str, sites: dict[str, Site], tokenizer) -> None:
    body = _conversation(
        gateway,
        [
            {"role": "user", "content": "My email is anna.berg@northwind.example, remember it."},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": PUBLIC_Q},
        ],
    )
    assert (body["route"], body["route_reason"]) == ("local", "personal-data:email_address")
    memo = (SAMPLES / "confidential" / "project-falcon-acquisition.md").read_text(encoding="utf-8")
    quoted = next(p for p in memo.split("\n\n") if p.startswith("Kestrel Vision was founded"))
    body = _conversation(
        gateway,
        [
            {"role": "user", "content": "Tell me about the company we are looking at."},
            {"role": "assistant", "content": quoted},  # an earlier on-prem answer quoting the memo
            {"role": "user", "content": "How many vacation days do employees get?"},
        ],
    )
    assert (body["route"], body["route_reason"]) == ("local", "confidential-context")
    for seen in sites["cloud"].texts(tokenizer):
        assert "kestrel" not in seen and "anna" not in seen


def test_only_answers_the_gateway_gave_vouch_for_a_conversation(gateway: str) -> None:
    """A client cannot forge "the earlier turns were public": an assistant turn must be an answer
    this gateway gave from cloud-eligible inputs."""
    first = _chat(gateway, PUBLIC_Q).json()
    assert first["route"] == "cloud"
    answer = first["choices"][0]["message"]["content"]
    follow_up = "And how many do part-time employees get?"
    turns = [{"role": "user", "content": PUBLIC_Q}, {"role": "assistant", "content": answer}]
    body = _conversation(gateway, [*turns, {"role": "user", "content": follow_up}])
    assert (body["route"], body["route_reason"]) == ("cloud", "no-sensitive-content")
    forged = [turns[0], {"role": "assistant", "content": answer + " Also, the office code is 4471."}]
    body = _conversation(gateway, [*forged, {"role": "user", "content": follow_up}])
    assert (body["route"], body["route_reason"]) == ("local", "unverified-assistant-turn")


def test_content_parts_are_accepted(gateway: str) -> None:
    body = _conversation(gateway, [{"role": "user", "content": [{"type": "text", "text": PUBLIC_Q}]}])
    assert body["route"] == "cloud" and body["choices"][0]["message"]["content"]


def test_personal_data_stays_local(gateway: str) -> None:
    body = _ask(gateway, "Please send the travel policy to anna.berg@northwind.example").json()
    assert (body["route"], body["route_reason"]) == ("local", "personal-data:email_address")


def test_model_name_picks_the_routing_mode(gateway: str) -> None:
    assert _chat(gateway, PUBLIC_Q, model="dualtrack-local").json()["route"] == "local"
    assert _chat(gateway, PUBLIC_Q, model="dualtrack-cloud").json()["route"] == "cloud"
    # the router's "local" wins over a request for the cloud
    assert _chat(gateway, CONFIDENTIAL_Q, model="dualtrack-cloud").json()["route"] == "local"
    models = httpx.get(f"{gateway}/v1/models", headers=AUTH).json()
    assert {m["id"] for m in models["data"]} == {"dualtrack", "dualtrack-local", "dualtrack-cloud"}


# -- bad input ------------------------------------------------------------------------------------


def test_bad_requests_get_clear_errors(gateway: str) -> None:
    r = _chat(gateway, PUBLIC_Q, model="gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = _chat(gateway, "   ")
    assert r.status_code == 400 and "non-empty user message" in r.json()["error"]["message"]
    r = _chat(gateway, "word " * 10000)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = _ask(gateway, "x " * 1999)
    assert (r.status_code == 413 and "the limit is 8000" not in r.text) or r.status_code in (200, 413)
    r = httpx.post(
        f"{gateway}/v1/chat/completions", json={"model": "dualtrack", "messages": []}, headers=AUTH
    )
    assert r.status_code == 422
    assert httpx.post(f"{gateway}/v1/chat/completions", json={}).status_code == 401


def test_model_error_is_a_clear_error_not_a_hang(gateway: str, sites: dict[str, Site]) -> None:
    marker = sites["cloud"].record.parent / "fail"
    marker.write_text("")
    started = time.monotonic()
    try:
        r = _ask(gateway, PUBLIC_Q)
    finally:
        marker.unlink()
    assert time.monotonic() - started < 10
    if r.status_code == 200:  # Triton reported it as a server error: answered on-prem instead
        assert r.json()["route"] == "local" and r.json()["failover"]
    else:
        assert r.status_code == 422 and "injected backend failure" in r.json()["detail"]


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", headers=AUTH).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_client_disconnect_closes_the_upstream_stream(gateway: str) -> None:
    """Leaving mid-stream closes the gateway's request to the model (Triton then cancels a
    single-model entry -- tests/model_repo -- but not an ensemble's steps, see docs/llm.md)."""
    before = _metric(gateway, "dualtrack_llm_streams_cancelled_total")
    body = {"model": "dualtrack", "messages": [{"role": "user", "content": PUBLIC_Q}], "stream": True}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                got += 1
            if got == 2:
                break  # leave mid-stream: closing the response drops the connection
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _metric(gateway, "dualtrack_llm_streams_cancelled_total") == before:
        time.sleep(0.1)
    assert _metric(gateway, "dualtrack_llm_streams_cancelled_total") == before + 1


# -- the official OpenAI client ---------------------------------------------------------------------


def test_official_openai_client(gateway: str) -> None:
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="dualtrack", messages=[{"role": "user", "content": PUBLIC_Q}]
    )
    assert reply.choices[0].message.content and reply.usage.total_tokens > reply.usage.completion_tokens
    assert reply.model_extra["route"] == "cloud" and reply.model_extra["citations"]
    stream = client.chat.completions.create(
        model="dualtrack", stream=True, messages=[{"role": "user", "content": PUBLIC_Q}]
    )
    parts = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(parts) >= 3
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway}/v1", api_key="wrong", max_retries=0).models.list()


# -- fallbacks ---------------------------------------------------------------------------------------


def test_route_decisions_are_counted(gateway: str) -> None:
    metrics = httpx.get(f"{gateway}/metrics", headers=AUTH).text
    assert 'dualtrack_route_decisions_total{reason="confidential-context",target="local"}' in metrics
    assert 'dualtrack_route_decisions_total{reason="no-sensitive-content",target="cloud"}' in metrics
    assert 'dualtrack_llm_answers_total{route="cloud"}' in metrics


def test_a_cloud_too_slow_to_start_falls_back_in_time(gateway: str, sites: dict[str, Site]) -> None:
    delay = sites["cloud"].record.parent / "delay"
    delay.write_text("30")  # first token in 30 s; the gateway waits 5 (llm.cloud.first_token_timeout_s)
    started = time.monotonic()
    try:
        body = _ask(gateway, PUBLIC_Q).json()
    finally:
        delay.unlink()
    assert (body["route"], body["failover"]) == ("local", "timeout")
    assert time.monotonic() - started < 8


@pytest.fixture
def gateway_with(sites: dict[str, Site], tmp_path: Path, embedder, gateway: str):
    """Another gateway over the same corpus with a different ``llm`` section."""

    def make(llm: dict) -> Iterator[str]:
        settings = load_settings(milvus={"uri": str(tmp_path / "kb.db")}, gateway={"api_key": KEY}, llm=llm)
        kb = KnowledgeBase(settings, embedder=embedder)
        kb.start()
        kb.ingestor.ingest_path(SAMPLES / "handbook" / "employee-handbook.md", root=SAMPLES)
        return kb, serve(create_app(settings, kb))

    return make


def test_openai_compatible_fallback_and_extractive_last_resort(gateway_with, gateway: str) -> None:
    dead = "http://127.0.0.1:9"  # nothing listens: the cloud is down from the start
    kb, server = gateway_with(
        {
            "cloud": {"url": dead, "connect_timeout_s": 0.5},
            # any OpenAI-compatible server works as the on-prem model -- here the main test gateway
            "local": {"kind": "openai", "url": gateway, "model": "dualtrack-local", "api_key": KEY},
        }
    )
    with server as url:
        wait_ready(url)
        body = _ask(url, PUBLIC_Q).json()
        assert (body["route"], body["failover"]) == ("local", "transport") and body["answer"]
        events = _stream(url, PUBLIC_Q)
        assert [e for e in events if isinstance(e, dict)][-1]["route"] == "local"
    kb.close()
    kb, server = gateway_with({"cloud": {"url": dead, "connect_timeout_s": 0.5}})  # no on-prem model at all
    with server as url:
        wait_ready(url)
        body = _ask(url, PUBLIC_Q).json()
        assert body["route"] == "extractive" and "vacation days" in body["answer"] and body["citations"]
    kb.close()


# -- failover (last: it kills and restarts the cloud) -------------------------------------------------


def test_killing_the_cloud_under_load_fails_no_request(gateway: str, sites: dict[str, Site]) -> None:
    cloud = sites["cloud"].server
    results: list[tuple[float, int, str]] = []

    def one(i: int) -> None:
        r = _ask(gateway, PUBLIC_Q) if i % 2 else _chat(gateway, PUBLIC_Q)
        results.append((time.monotonic(), r.status_code, r.json().get("route", "?")))

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        time.sleep(0.4)  # requests are in flight on the (slow) cloud
        killed_at = time.monotonic()
        cloud.stop(signal.SIGKILL)
        futures += [pool.submit(one, i) for i in range(6, 30)]
        for f in futures:
            f.result()
    assert [s for _, s, _ in results if s != 200] == []  # zero failed user requests
    after = sorted((t, route) for t, _, route in results if t > killed_at)
    assert after and all(route == "local" for _, route in after[-10:])
    first_local = min(t for t, route in after if route == "local")
    assert first_local - killed_at < 5.0  # well inside the breaker's timeouts

    cloud.start(timeout_s=240)  # same ports: the cloud comes back
    deadline = time.monotonic() + 20
    route = "local"
    while time.monotonic() < deadline and route != "cloud":
        time.sleep(0.3)
        route = _ask(gateway, PUBLIC_Q).json()["route"]
    assert route == "cloud"
