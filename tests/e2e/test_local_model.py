"""A real generative model on premises: the gateway answering with llama.cpp's server.

The on-prem model is a real GGUF (Gemma 3 270M base, Q4_K_M -- a test dependency) behind the
real ``llama_cpp.server``; the cloud is a real tritonserver with the CPU TensorRT-LLM stand-in
(TEST DOUBLE). A base model does not follow instructions, so these tests assert real tokens,
shapes, routes and timings -- not wording.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from services.config import load_settings
from services.gateway.app import create_app
from services.kb.service import KnowledgeBase
from services.llamacpp import LlamaServer, LlamaServerError, check_gguf
from tests.support import (
    ROOT,
    SAMPLE_CONTACTS,
    cite_prefix_ids,
    free_port,
    gemma_gguf,
    ingest_samples,
    render_test_repo,
    serve,
    triton_with_cpu_backend,
    wait_ready,
)

KEY = "local-model-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
PUBLIC_Q = "How many vacation days do full-time employees get per year?"
CONFIDENTIAL_Q = "What enterprise value does management propose for Kestrel Vision?"
LLAMA_PYTHON = ROOT / ".venv-llama" / "bin" / "python"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    server = LlamaServer(
        gemma_gguf(),
        free_port(),
        python=str(LLAMA_PYTHON),
        threads=2,
        workdir=tmp_path_factory.mktemp("llama"),
    )
    server.start(timeout_s=120)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cloud")
    repo = render_test_repo(root / "repo")
    record = root / "record" / "calls.jsonl"
    record.parent.mkdir(parents=True)
    server = triton_with_cpu_backend(
        repo,
        root / "work",
        record,
        DUALTRACK_TEST_TOKEN_DELAY_S="0.05",
        DUALTRACK_TEST_ANSWER_PREFIX_IDS=cite_prefix_ids(),  # its answers cite [1]
    )
    server.start(timeout_s=240)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateway(llama: LlamaServer, cloud, tmp_path_factory: pytest.TempPathFactory, embedder) -> Iterator[str]:
    settings = load_settings(
        milvus={"uri": str(tmp_path_factory.mktemp("kb") / "kb.db")},
        gateway={"api_key": KEY},
        llm={
            "cloud": {"url": cloud.url, "model": "ensemble", "first_token_timeout_s": 5},
            "local": {
                "kind": "openai",
                "url": llama.url,
                "model": llama.alias,
                "tokenizer": str(llama.model),
                "timeouts": "measured",
                "first_token_timeout_s": 10,
                "request_timeout_s": 60,
            },
            "max_tokens": 32,
            "routing": {"dlp_allow": SAMPLE_CONTACTS},
            "temperature": 0,  # a base model sampled at random can end at once; greedy is repeatable
            "breaker": {"failure_threshold": 2, "reset_timeout_s": 2.0, "probe_interval_s": 0.2},
        },
    )
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    ingest_samples(kb)
    with serve(create_app(settings, kb)) as url:
        wait_ready(url)
        yield url
    kb.close()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=120, max_retries=0)


def test_confidential_question_is_answered_by_the_real_local_model(gateway: str) -> None:
    reply = _client(gateway).chat.completions.create(
        model="dualtrack", messages=[{"role": "user", "content": CONFIDENTIAL_Q}]
    )
    extra = reply.model_extra or {}
    assert (extra["route"], extra["route_reason"]) == ("local", "confidential-context")
    answer = reply.choices[0].message.content or ""
    assert answer.strip()  # real tokens from the local model
    usage = reply.usage.model_dump()
    assert usage["prompt_tokens_exact"] is True  # counted with the GGUF's own tokenizer
    assert 1 <= usage["completion_tokens"] <= 32 + 4 and usage["prompt_tokens"] > 100
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streaming_through_the_official_client_yields_real_tokens(gateway: str) -> None:
    started = time.monotonic()
    stream = _client(gateway).chat.completions.create(
        model="dualtrack-local", messages=[{"role": "user", "content": PUBLIC_Q}], stream=True
    )
    first_at: float | None = None
    pieces: list[str] = []
    last = None
    for chunk in stream:
        last = chunk
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            first_at = first_at or time.monotonic()
            pieces.append(delta)
    assert (
        pieces and "".join(pieces).strip()
    )  # what a base model says varies; that it says something does not
    assert first_at is not None and first_at - started < 30
    extra = last.model_extra or {}
    usage = last.usage.model_dump()
    assert extra["route"] == "local" and usage["prompt_tokens_exact"] is True
    assert usage["completion_tokens"] >= 1


def test_ask_hides_reasoning_and_cites_only_what_it_cites(gateway: str) -> None:
    r = httpx.post(f"{gateway}/v1/ask", json={"question": PUBLIC_Q}, headers=AUTH, timeout=120)
    body = r.json()
    assert r.status_code == 200 and body["route"] == "cloud"  # public: the cloud answers
    assert body["reasoning"] is None and body["unresolved_citations"] == []
    assert [c["n"] for c in body["citations"]] == [1]  # the stand-in cites [1], and only that


def test_with_a_worked_example_the_base_model_returns_the_fact(gateway: str) -> None:
    # A base model continues text rather than following instructions: one worked question and
    # answer, and the start of the answer, are what it needs to take the figure from a passage.
    question = (
        "Q: What load can a Tern T200 carry?\n"
        "A: A Tern T200 carries loads of up to 200 kg [1].\n"
        "Q: What load can a Tern T500 carry?\n"
        "A: A Tern T500 carries loads of up to"
    )
    reply = _client(gateway).chat.completions.create(
        model="dualtrack-local", messages=[{"role": "user", "content": question}]
    )
    assert (reply.model_extra or {})["route"] == "local"
    answer = reply.choices[0].message.content or ""
    # 500 kg is in the robot FAQ's passage only: not in the example, not in the question
    assert re.search(r"\b500 kg\b", answer), answer


def test_a_disconnected_client_stops_the_local_generation(gateway: str, llama: LlamaServer) -> None:
    body = {
        "model": "dualtrack-local",
        "messages": [{"role": "user", "content": PUBLIC_Q}],
        "stream": True,
        "max_tokens": 1500,  # ~25 s of generation at this model's speed, if nobody stopped it
    }
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
                if seen >= 3:
                    break
    # the server generates one answer at a time: the next one starts only if the first stopped
    started = time.monotonic()
    reply = httpx.post(
        f"{llama.url}/v1/chat/completions",
        json={"model": llama.alias, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200 and time.monotonic() - started < 10


def test_a_hung_local_model_is_a_clear_error_not_a_hang(gateway: str, llama: LlamaServer) -> None:
    assert llama.proc is not None
    os.killpg(llama.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = httpx.post(
            f"{gateway}/v1/chat/completions",
            json={"model": "dualtrack-local", "messages": [{"role": "user", "content": PUBLIC_Q}]},
            headers=AUTH,
            timeout=120,
        )
        elapsed = time.monotonic() - started
    finally:
        os.killpg(llama.proc.pid, signal.SIGCONT)
    assert r.status_code == 503 and "no answer in time" in r.json()["error"]["message"]
    assert elapsed < 45  # the measured deadline for this fast model stays near its 10 s floor


def test_cloud_killed_mid_run_local_model_answers_without_failures(gateway: str, cloud) -> None:
    results: list[tuple[int, str]] = []

    def one() -> None:
        r = httpx.post(f"{gateway}/v1/ask", json={"question": PUBLIC_Q}, headers=AUTH, timeout=180)
        results.append((r.status_code, r.json().get("route", r.text)))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # in flight on the (slow) cloud
    cloud.stop(signal.SIGKILL)
    for t in threads:
        t.join()
    assert [s for s, _ in results] == [200, 200, 200]
    assert {route for _, route in results} <= {"cloud", "local"} and "local" in {r for _, r in results}
    after = httpx.post(f"{gateway}/v1/ask", json={"question": PUBLIC_Q}, headers=AUTH, timeout=180).json()
    assert "route" in after, after
    assert after["route"] == "local" and after["answer"].strip()


def test_gguf_paths_are_checked(tmp_path: Path) -> None:
    with pytest.raises(LlamaServerError, match="no such file"):
        check_gguf(tmp_path / "missing.gguf")
    notgguf = tmp_path / "weights.gguf"
    notgguf.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(LlamaServerError, match="not a GGUF file"):
        check_gguf(notgguf)
    assert check_gguf(gemma_gguf()) == gemma_gguf()
