"""The rendered repository served by the real tritonserver binary (CPU; TensorRT-LLM replaced by
the CPU stand-in under tests/triton): the real preprocessing, postprocessing and ensemble run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from transformers import AutoTokenizer

from services.tritonserver import TritonServer
from tests.support import (
    close_stream_early,
    offline_tokenizer_dir,
    recorded_calls,
    render_test_repo,
    triton_with_cpu_backend,
)


@pytest.fixture(scope="module")
def onprem(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonServer, Path]]:
    root = tmp_path_factory.mktemp("triton-onprem")
    repo = render_test_repo(root / "repo", role="onprem")
    record = root / "record" / "calls.jsonl"
    record.parent.mkdir()
    server = triton_with_cpu_backend(repo, root / "work", record)
    server.start(timeout_s=180)
    try:
        yield server, record
    finally:
        server.stop()


def test_generate_runs_the_whole_ensemble(onprem: tuple[TritonServer, Path]) -> None:
    server, record = onprem
    prompt = "Which river flows through Paris? Answer briefly"
    before = len(recorded_calls(record))
    r = httpx.post(
        f"{server.url}/v2/models/local_fallback/generate",
        json={"text_input": prompt, "max_tokens": 6},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == "through paris? answer briefly"  # the stand-in echoes the prompt's tail
    call = recorded_calls(record)[before]
    tokenizer = AutoTokenizer.from_pretrained(offline_tokenizer_dir())
    assert call["input_ids"] == tokenizer.encode(prompt)  # real preprocessing tokenized it
    assert call["request_output_len"] == 6 and call["streaming"] is False
    assert call["end_id"] == tokenizer.sep_token_id


def test_streaming_sends_token_by_token(onprem: tuple[TritonServer, Path]) -> None:
    server, record = onprem
    events = []
    with httpx.stream(
        "POST",
        f"{server.url}/v2/models/local_fallback/generate_stream",
        json={"text_input": "one two three four five", "max_tokens": 4, "stream": True},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    texts = [e["text_output"] for e in events if e["text_output"]]
    assert texts == ["three", "four", "five"]  # + the [SEP] token, decoded to nothing
    assert recorded_calls(record)[-1]["streaming"] is True and recorded_calls(record)[-1]["tokens_sent"] == 4


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("   ", "the prompt is empty"),
        ("word " * 9000, "tokens; this model accepts at most 8192"),
    ],
)
def test_bad_prompts_are_refused_with_the_reason(
    onprem: tuple[TritonServer, Path], prompt: str, message: str
) -> None:
    server, _ = onprem
    r = httpx.post(
        f"{server.url}/v2/models/local_fallback/generate",
        json={"text_input": prompt, "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 400 and message in r.json()["error"]


def test_backend_failure_is_an_error_not_a_hang(onprem: tuple[TritonServer, Path]) -> None:
    server, record = onprem
    marker = record.parent / "fail"
    marker.write_text("")
    try:
        r = httpx.post(
            f"{server.url}/v2/models/local_fallback/generate",
            json={"text_input": "hello there", "max_tokens": 3},
            timeout=30,
        )
    finally:
        marker.unlink()
    assert r.status_code >= 400 and "injected backend failure" in r.text


def test_embedding_model_matches_the_knowledge_base(onprem: tuple[TritonServer, Path], embedder) -> None:
    server, _ = onprem
    body = {
        "inputs": [
            {
                "name": "text",
                "shape": [2, 1],
                "datatype": "BYTES",
                "data": ["vacation days", "per diem abroad"],
            },
            {"name": "is_query", "shape": [2, 1], "datatype": "BOOL", "data": [True, False]},
        ]
    }
    r = httpx.post(f"{server.url}/v2/models/embedding/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    vectors = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(vectors[0], embedder.embed_query("vacation days"), atol=1e-5)
    np.testing.assert_allclose(vectors[1], embedder.embed_passages(["per diem abroad"])[0], atol=1e-5)


def test_closing_a_stream_cancels_a_single_model_entry(onprem: tuple[TritonServer, Path]) -> None:
    """What the gateway relies on when a client leaves: Triton cancels the request of a
    single-model entry point (the LLM-API path's shape) when its HTTP stream is closed."""
    server, record = onprem
    body = {
        "input_ids": list(range(1000, 1012)),
        "input_lengths": [12],
        "request_output_len": [12],
        "streaming": [True],
    }
    call = close_stream_early(f"{server.url}/v2/models/tensorrt_llm/generate_stream", body, record)
    assert call["cancelled"] is True and call["tokens_sent"] < 12


def test_foreground_launcher_for_systemd(tmp_path: Path) -> None:
    """`python -m services.tritonserver` (what the on-prem unit runs): ready, then SIGTERM stops it."""
    import signal
    import subprocess
    import sys

    from tests.support import free_port

    repo = render_test_repo(tmp_path / "repo", role="onprem")
    for model in ("local_fallback", "preprocessing", "tensorrt_llm", "postprocessing"):
        import shutil

        shutil.rmtree(repo / model)  # the embedding model alone: no TensorRT-LLM backend needed
    (repo / "dualtrack-profile.json").unlink()
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.tritonserver",
            "--model-repository",
            str(repo),
            "--http-port",
            str(port),
            "--grpc-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--workdir",
            str(tmp_path / "work"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert f"ready on http://127.0.0.1:{port}" in line, line
        assert httpx.get(f"http://127.0.0.1:{port}/v2/models/embedding/ready", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    bad = subprocess.run(
        [sys.executable, "-m", "services.tritonserver", "--model-repository", str(tmp_path / "no")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not a directory" in bad.stderr
