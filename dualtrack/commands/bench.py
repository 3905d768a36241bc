"""``dualtrack bench``: benchmarks (figures go to docs/benchmarks.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from dualtrack.commands.common import console, fail
from services.llamacpp import LlamaServerError

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (figures go to docs/benchmarks.md).")

# -- bench ---------------------------------------------------------------------------------------


@bench_app.command("kb")
def bench_kb(
    sizes: Annotated[
        str, typer.Option(help="Comma-separated vector counts for search latency")
    ] = "100000,1000000",
    ef: Annotated[str, typer.Option(help="Comma-separated HNSW ef values")] = "32,64,128",
    queries: Annotated[int, typer.Option(min=10)] = 200,
    out: Annotated[Path | None, typer.Option(help="Write results as JSON here")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Scratch directory (default: a temp dir)")] = None,
    milvus_uri: Annotated[
        str | None, typer.Option(help="Benchmark this Milvus (default: start a Milvus Lite server)")
    ] = None,
    copies: Annotated[int, typer.Option(min=1, help="Copies of the sample corpus to ingest")] = 5,
    ingest_batch: Annotated[
        int, typer.Option(min=2, help="Documents per write in the batched ingest run")
    ] = 16,
) -> None:
    """Ingest throughput, search latency/recall vs exact FLAT, and gateway overhead."""
    from dualtrack.bench import run_kb_bench

    try:
        run_kb_bench(
            console,
            sizes=[int(s) for s in sizes.split(",") if s.strip()],
            efs=[int(e) for e in ef.split(",") if e.strip()],
            n_queries=queries,
            out=out,
            workdir=workdir,
            milvus_uri=milvus_uri,
            copies=copies,
            ingest_batch=ingest_batch,
        )
    except ValueError as exc:
        raise fail(str(exc)) from None


@bench_app.command("retrieval")
def bench_retrieval(
    sets: Annotated[
        str, typer.Option(help="Comma-separated question sets: public, samples")
    ] = "public,samples",
    rounds: Annotated[int, typer.Option(min=1, help="Passes over the questions for the latency figures")] = 5,
    out: Annotated[Path | None, typer.Option(help="Write results as JSON here")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Scratch directory (default: a temp dir)")] = None,
) -> None:
    """hit@1, hit@3, MRR@10 and answer-in-context of dense, BM25 and hybrid search over chunks
    sized to the embedder and over the earlier long chunks, and hybrid's latency cost, on Milvus
    Lite."""
    from dualtrack.bench_retrieval import run_retrieval_bench

    try:
        run_retrieval_bench(
            console,
            sets=[s.strip() for s in sets.split(",") if s.strip()],
            out=out,
            workdir=workdir,
            rounds=rounds,
        )
    except ValueError as exc:
        raise fail(str(exc)) from None


@bench_app.command("plan")
def bench_plan(
    repeat: Annotated[int, typer.Option(min=1, help="Runs per stack (median reported)")] = 5,
    out: Annotated[Path | None, typer.Option(help="Write results as JSON here")] = None,
) -> None:
    """Mocked Pulumi run of each stack, cold (fresh process) and warm, vs an empty program."""
    from dualtrack.bench_plan import run_plan_bench

    run_plan_bench(console, repeat=repeat, out=out)


@bench_app.command("answers")
def bench_answers(
    model: Annotated[Path | None, typer.Option(help="A GGUF model, served here by llama.cpp")] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="Or an OpenAI-compatible server already running (its base URL)")
    ] = None,
    endpoint_model: Annotated[str, typer.Option(help="The model name that server expects")] = "local-model",
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for --model")] = os.cpu_count() or 2,
    out: Annotated[Path | None, typer.Option(help="Write results as JSON here")] = None,
) -> None:
    """Answer quality (fact hit rate, citation precision) and latency of a real model against the
    extractive baseline, and the gateway's own share of the time to first token."""
    from dualtrack.bench_answers import run_answers_bench

    if (model is None) == (endpoint is None):
        raise fail("give one of --model PATH.gguf and --endpoint URL")
    try:
        run_answers_bench(console, model, endpoint, endpoint_model, threads, out)
    except (LlamaServerError, ValueError) as exc:
        raise fail(str(exc)) from None
