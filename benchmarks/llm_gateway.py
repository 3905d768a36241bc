"""The answering path, measured: gateway overhead, time-to-first-token overhead, failover time.

Setup (all real processes on loopback, CPU only): two ``tritonserver`` binaries serving
the rendered DeepSeek-R1-Distill repository (real ensemble, preprocessing and
postprocessing) with the CPU stand-in for TensorRT-LLM from ``tests/triton`` -- a TEST
DOUBLE, used here because no GPU engine can run on this machine; it echoes the prompt's
tail, so generation time is small and the gateway's own cost is visible. The gateway
runs in-process under uvicorn over the sample corpus (Milvus Lite embedded).

1. **overhead** -- the same question ``--requests`` times through ``POST
   /v1/chat/completions`` (non-streaming) vs the exact same prompt sent straight to
   Triton's ``generate``. Baseline: the direct call. The gateway's *own* time is its
   latency minus the direct call's minus retrieval (the ``Server-Timing: search`` it
   reports), i.e. routing, prompt building, proxying and JSON.
2. **ttft** -- time to the first content chunk, gateway SSE vs Triton
   ``generate_stream``. Baseline: direct.
3. **failover** -- requests in a loop from 4 threads; the cloud server is killed (SIGKILL)
   mid-run; reports failed requests and the time from the kill to the first answer
   served on-prem, and the breaker's state.

    PYTHONPATH=. .venv/bin/python benchmarks/llm_gateway.py [--requests 200] [--out bench-results/llm.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.config import load_settings  # noqa: E402
from services.gateway.app import create_app  # noqa: E402
from services.kb.service import KnowledgeBase  # noqa: E402
from services.llm.prompt import build_prompt  # noqa: E402
from tests.support import free_port, ingest_samples, render_test_repo, triton_with_cpu_backend  # noqa: E402

KEY = "bench-key-0123456789"
QUESTION = "How many vacation days do full-time employees get per year?"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p95_ms": round(pct(ms, 0.95), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


def start_gateway(settings, kb) -> tuple[str, uvicorn.Server]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, kb), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return url, server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("gateway not ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dualtrack-bench-llm-"))
    sites = {}
    for name, role in (("cloud", "cloud"), ("local", "onprem")):
        repo = render_test_repo(work / name / "repo", role=role)
        record = work / name / "calls.jsonl"
        sites[name] = triton_with_cpu_backend(repo, work / name / "work", record)
    threads = [threading.Thread(target=s.start, kwargs={"timeout_s": 300}) for s in sites.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cloud, local = sites["cloud"], sites["local"]
    settings = load_settings(
        milvus={"uri": str(work / "kb.db")},
        gateway={"api_key": KEY},
        llm={
            "cloud": {"url": cloud.url, "model": "ensemble"},
            "local": {"url": local.url, "model": "local_fallback"},
            "max_tokens": 16,
        },
    )
    kb = KnowledgeBase(settings)
    kb.start()
    ingest_samples(kb)
    url, gateway = start_gateway(settings, kb)
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "dualtrack", "messages": [{"role": "user", "content": QUESTION}]}
    hits = kb.search(QUESTION)
    prompt = build_prompt(
        settings.llm.system_prompt,
        QUESTION,
        hits,
        context_budget=settings.llm.context_token_budget,
        max_tokens=settings.llm.max_prompt_tokens,
    ).text
    direct_body = {"text_input": prompt, "max_tokens": 16}
    result: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} cpus={len(__import__('os').sched_getaffinity(0))}",
        "requests": args.requests,
    }
    try:
        with httpx.Client(timeout=60, headers=auth) as client:
            for _ in range(10):  # warm-up both paths
                client.post(f"{url}/v1/chat/completions", json=chat)
                client.post(f"{cloud.url}/v2/models/ensemble/generate", json=direct_body)

            def direct_stream() -> float:
                """What the gateway itself does upstream: read a whole generate_stream."""
                t = time.perf_counter()
                with client.stream(
                    "POST",
                    f"{cloud.url}/v2/models/ensemble/generate_stream",
                    json={**direct_body, "stream": True},
                ) as r:
                    for _ in r.iter_lines():
                        pass
                return time.perf_counter() - t

            direct, oneshot, through, search = [], [], [], []
            for _ in range(args.requests):  # interleaved: background noise hits all three
                direct.append(direct_stream())
                t = time.perf_counter()
                r = client.post(f"{cloud.url}/v2/models/ensemble/generate", json=direct_body)
                oneshot.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
                t = time.perf_counter()
                r = client.post(f"{url}/v1/chat/completions", json=chat)
                through.append(time.perf_counter() - t)
                assert r.status_code == 200 and r.json()["route"] == "cloud", r.text
                search.append(float(r.headers["server-timing"].split("dur=")[1]) / 1000)
            own = [g - d - s for g, d, s in zip(through, direct, search, strict=True)]
            result["overhead"] = {
                "direct_triton_stream": summary(direct),
                "direct_triton_generate": summary(oneshot),
                "gateway": summary(through),
                "retrieval": summary(search),
                "gateway_own": summary(own),
                "gateway_vs_direct": round(statistics.median(through) / statistics.median(direct), 2),
            }

            def first_chunk(method_url: str, body: dict, is_gateway: bool) -> tuple[float, float]:
                """(time to the first content, retrieval time the gateway reported)."""
                t = time.perf_counter()
                with client.stream("POST", method_url, json=body) as r:
                    timing = r.headers.get("server-timing", "search;dur=0")
                    lines = r.iter_lines()
                    for line in lines:
                        if (is_gateway and '"content": "' in line and '"content": ""' not in line) or (
                            not is_gateway and line.startswith("data:") and '"text_output":""' not in line
                        ):
                            elapsed = time.perf_counter() - t
                            for _ in lines:  # drain: same work per request on both paths
                                pass
                            return elapsed, float(timing.split("dur=")[1]) / 1000
                raise RuntimeError("no content")

            ttft_direct, ttft_gateway, ttft_own = [], [], []
            for _ in range(max(20, args.requests // 2)):
                d, _ = first_chunk(
                    f"{cloud.url}/v2/models/ensemble/generate_stream", {**direct_body, "stream": True}, False
                )
                g, retrieval = first_chunk(f"{url}/v1/chat/completions", {**chat, "stream": True}, True)
                ttft_direct.append(d)
                ttft_gateway.append(g)
                ttft_own.append(g - d - retrieval)
            result["ttft"] = {
                "direct_triton": summary(ttft_direct),
                "gateway": summary(ttft_gateway),
                "gateway_own": summary(ttft_own),
            }

        outcomes: list[tuple[float, int, str]] = []
        stop = threading.Event()

        def loop() -> None:
            with httpx.Client(timeout=60, headers=auth) as c:
                while not stop.is_set():
                    r = c.post(f"{url}/v1/chat/completions", json=chat)
                    outcomes.append((time.monotonic(), r.status_code, r.json().get("route", "?")))

        workers = [threading.Thread(target=loop) for _ in range(4)]
        for w in workers:
            w.start()
        time.sleep(2.0)
        killed = time.monotonic()
        cloud.stop(signal.SIGKILL)
        time.sleep(3.0)
        stop.set()
        for w in workers:
            w.join()
        after = [(t, route) for t, _, route in outcomes if t > killed]
        first_local = min(t for t, route in after if route == "local")
        result["failover"] = {
            "requests": len(outcomes),
            "failed": sum(1 for _, s, _ in outcomes if s != 200),
            "kill_to_first_local_ms": round((first_local - killed) * 1000, 1),
            "served_local_after_kill": sum(1 for _, route in after if route == "local"),
            "breaker_state": next(
                line.split()[1]
                for line in httpx.get(f"{url}/metrics").text.splitlines()
                if line.startswith("dualtrack_llm_breaker_state ")
            ),
        }
    finally:
        gateway.should_exit = True
        for s in sites.values():
            s.stop()
        kb.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
