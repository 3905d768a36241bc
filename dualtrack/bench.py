"""``dualtrack bench kb``: how fast the knowledge base is, measured.

Three parts, each reported as ratios against a baseline measured in the same run:

1. **ingest** -- the sample corpus (several copies) through the real pipeline, one document
   per write and then ``--ingest-batch`` documents per write (``Ingestor.ingest_many``);
   chunks/s end to end and the share of time in parse, chunk, embed and insert.
   Baselines: one document per write, and the embedding model alone on the same chunk texts.
2. **search** -- synthetic clustered 384-d vectors (100k, 1M, ...) in the
   configured Milvus, HNSW at several ``ef``: p50/p95 latency of
   ``KnowledgeStore.search`` (which includes the active-version check) and
   recall@10. Baseline: exact search (numpy, FLAT-equivalent) on the same data.
3. **gateway** -- the same text queries in-process and through the gateway's
   ``POST /v1/search`` over HTTP. Baseline: in-process.

Milvus is a Milvus Lite server started here unless ``--milvus-uri`` points at
another (``benchmarks/kb-standalone.sh`` runs this against Milvus standalone).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from dualtrack.local import LOOPBACK, LocalStack
from services.config import Settings, load_settings
from services.kb import schema
from services.kb.access import EVERYONE, EVERYTHING, Acl
from services.kb.classification import Classification
from services.kb.ingest import Upload
from services.kb.service import KnowledgeBase
from services.kb.store import DocumentRecord, KnowledgeStore

SAMPLES = Path(__file__).resolve().parent.parent / "docs" / "samples"
QUERIES = [
    "How many vacation days do full-time employees get?",
    "What is the per-diem rate for a full day abroad?",
    "How do I promote the replica when the primary database fails?",
    "Who do I page for a SEV1 incident?",
    "How long does the robot battery last on one charge?",
    "What is the mileage rate for private cars?",
    "When must expense receipts be submitted?",
    "Which multi-factor authentication methods are allowed?",
    "What is the recovery point objective for the database?",
    "What does the warranty cover for the robots?",
    "How are post-mortems scheduled after an incident?",
    "Can I work remotely from another country?",
    "What laptop encryption is required?",
    "What is the maximum payload of the robot?",
    "How often are access reviews done?",
    "What are the support hours for customers?",
]


@dataclass(frozen=True)
class Stats:
    p50_ms: float
    p95_ms: float
    mean_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        a = np.asarray(seconds) * 1000
        return cls(float(np.percentile(a, 50)), float(np.percentile(a, 95)), float(a.mean()))


def run_kb_bench(
    console: Console,
    *,
    sizes: list[int],
    efs: list[int],
    n_queries: int,
    out: Path | None,
    workdir: Path | None,
    milvus_uri: str | None = None,
    copies: int = 5,
    ingest_batch: int = 16,
) -> dict[str, Any]:
    if any(n < 1000 for n in sizes) or not efs or any(e < 10 for e in efs):
        raise ValueError("sizes must be >= 1000 vectors and ef values >= 10 (recall@10 needs ef >= 10)")
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["dualtrack", *sys.argv[1:]]) if sys.argv else "",
        "machine": machine(),
    }
    with ExitStack() as cleanup:
        work = workdir or Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="dualtrack-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        uri = milvus_uri or f"http://{LOOPBACK}:{_free_port()}"
        base = load_settings(milvus={"uri": uri, "timeout_s": 600}, gateway={"port": _free_port()})
        # the same local stack `make up` runs, in a scratch home; the gateway starts only for part 3
        local = LocalStack(base, home=work / "stack", manage_milvus=milvus_uri is None)
        cleanup.callback(local.down)
        if milvus_uri is None:
            local.start_milvus()
            report["milvus"] = f"Milvus Lite server {metadata.version('milvus-lite')} ({uri})"
        else:
            report["milvus"] = f"external Milvus at {uri}"
        console.print(f"[bold]Milvus:[/] {report['milvus']}")

        report["ingest"] = bench_ingest(console, base, copies, ingest_batch)
        report["search"] = [bench_search(console, base, n, efs, n_queries) for n in sizes]
        report["gateway"] = bench_gateway(console, base, local, n_queries)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"results written to {out}")
    return report


# -- environment ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "os": platform.platform(),
        "pymilvus": metadata.version("pymilvus"),
        "sentence_transformers": metadata.version("sentence-transformers"),
        "torch": metadata.version("torch"),
    }


def _drop(settings: Settings) -> None:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=settings.milvus.uri, timeout=60)
    for name in (settings.milvus.collection, schema.registry_name(settings.milvus.collection)):
        if client.has_collection(name):
            client.drop_collection(name)
    client.close()


def _with(settings: Settings, **milvus: Any) -> Settings:
    merged = {**settings.milvus.model_dump(), **milvus}
    return settings.model_copy(update={"milvus": type(settings.milvus)(**merged)})


# -- 1. ingest -----------------------------------------------------------------------------------


def bench_ingest(console: Console, base: Settings, copies: int, batch: int = 16) -> dict[str, Any]:
    """The corpus ingested one document per write (``ingest_bytes``, the baseline), then
    ``batch`` documents per write (``ingest_many``), each into a fresh collection."""
    files = [
        p
        for p in sorted(SAMPLES.rglob("*"))
        if p.suffix in (".md", ".txt", ".html", ".pdf", ".docx") and p.name != "README.md"
    ]
    uploads = [
        Upload(path.read_bytes(), f"copy{k}/{path.relative_to(SAMPLES).as_posix()}")
        for k in range(copies)
        for path in files
    ]
    runs: dict[str, Any] = {}
    embed_only = 0.0
    for mode, size in (("one per write", 1), (f"{batch} per write", batch)):
        settings = _with(base, collection=f"bench_ingest_{size}")
        _drop(settings)
        kb = KnowledgeBase(settings)
        kb.start()
        stages = {"parse": 0.0, "chunk": 0.0, "embed": 0.0, "insert": 0.0}
        chunks = 0
        started = time.perf_counter()
        with console.status(f"ingest: the sample corpus, {mode}..."):
            for at in range(0, len(uploads), size):
                group = uploads[at : at + size]
                done = (
                    [kb.ingestor.ingest_bytes(group[0].data, group[0].source)]
                    if size == 1
                    else kb.ingestor.ingest_many(group)
                )
                for r in done:
                    if r.status != "ingested":
                        raise RuntimeError(f"bench ingest failed for {r.name}: {r.reason}")
                    chunks += r.chunks
                    for stage, seconds in r.timings.items():
                        stages[stage] += seconds
        wall = time.perf_counter() - started
        if not embed_only:
            texts = [
                c.text
                for d in kb.store.list_documents(reader=EVERYTHING)
                for c in kb.store.chunks_of(d.doc_id, d.version)
            ]
            t0 = time.perf_counter()
            kb.embedder.embed_passages(texts)
            embed_only = time.perf_counter() - t0
        kb.close()
        _drop(settings)
        total = sum(stages.values())
        runs[mode] = {
            "documents_per_write": size,
            "chunks_per_s": round(chunks / wall, 1),
            "wall_s": round(wall, 3),
            "share": {k: round(v / total, 4) for k, v in stages.items()},
        }
    result = {
        "documents": len(uploads),
        "chunks": chunks,
        "baseline_embed_only_s": round(embed_only, 3),
        "runs": runs,
        "speedup_batched_vs_one": round(
            runs["one per write"]["wall_s"] / runs[f"{batch} per write"]["wall_s"], 2
        ),
    }
    table = Table(title=f"ingest: {result['documents']} documents, {chunks} chunks")
    for col in ("writes", "chunks/s", "parse", "chunk", "embed", "insert", "end-to-end / embed-only"):
        table.add_column(col)
    for mode, run in runs.items():
        sh = run["share"]
        table.add_row(
            mode,
            f"{run['chunks_per_s']}",
            *(f"{sh[k]:.1%}" for k in ("parse", "chunk", "embed", "insert")),
            f"{run['wall_s'] / embed_only:.2f}x",
        )
    console.print(table)
    return result


# -- 2. search -----------------------------------------------------------------------------------


def synthetic(n: int, dim: int, seed: int) -> np.ndarray:
    """Clustered unit vectors: 1,024 topics plus noise, a shape closer to text
    embeddings than uniform noise (on which every ANN index looks bad)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1024, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        topic = rng.integers(0, len(centres), stop - start)
        block = centres[topic] + 0.6 * rng.normal(size=(stop - start, dim)).astype(np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def exact_top10(data: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Exact inner-product top-10 (the FLAT baseline) and its per-query latency."""
    truth = np.empty((len(queries), 10), dtype=np.int64)
    latencies = []
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        scores = data @ q
        top = np.argpartition(-scores, 10)[:10]
        truth[i] = top[np.argsort(-scores[top])]
        latencies.append(time.perf_counter() - t0)
    return truth, latencies


def bench_search(console: Console, base: Settings, n: int, efs: list[int], n_queries: int) -> dict[str, Any]:
    dim = 384
    settings = _with(base, collection=f"bench_search_{n}")
    _drop(settings)
    store = KnowledgeStore(settings.milvus, dim)
    store.connect()
    vectors = synthetic(n, dim, seed=n)
    rng = np.random.default_rng(7)
    picks = rng.integers(0, n, n_queries)
    # a query is a stored vector moved by noise of norm ~0.3 (cosine ~0.95 to it)
    queries = vectors[picks] + (0.3 / np.sqrt(dim)) * rng.normal(size=(n_queries, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    per_doc = 100
    t0 = time.perf_counter()
    with console.status(f"search {n:,}: inserting vectors..."):
        for start in range(0, n, 5000):
            rows = [
                {
                    schema.ID: str(i),
                    schema.DOC_ID: f"doc{i // per_doc}",
                    schema.VERSION: "v1",
                    schema.CHUNK_NO: i % per_doc,
                    schema.TEXT: f"synthetic chunk {i}",
                    schema.VECTOR: vectors[i],
                    schema.CLASSIFICATION: "internal",
                    schema.SOURCE: f"synthetic/doc{i // per_doc}",
                    schema.PAGE: 0,
                    schema.METADATA: {},
                    schema.ACL: [EVERYONE],
                    schema.ACL_KEY: EVERYONE,
                }
                for i in range(start, min(n, start + 5000))
            ]
            store.client.insert(store.collection, rows)
        docs = [
            DocumentRecord(
                f"doc{d}",
                "v1",
                "-",
                Classification.INTERNAL,
                f"synthetic/doc{d}",
                f"doc{d}",
                per_doc,
                time.time(),
                {},
                Acl.everyone(),
            )
            for d in range((n + per_doc - 1) // per_doc)
        ]
        for start in range(0, len(docs), 10_000):
            store.activate(*docs[start : start + 10_000])
    insert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with console.status(f"search {n:,}: flushing and building HNSW..."):
        store.flush()
        _wait_indexed(store, n)
    index_s = time.perf_counter() - t0

    truth, exact_lat = exact_top10(vectors, queries)
    exact = Stats.of(exact_lat)
    rows_out = []
    for ef in efs:
        s = _with(settings, search={"hnsw_ef": ef, "ivf_nprobe": 16})
        store.settings = s.milvus
        for q in queries[:10]:  # warm caches
            store.search(q, 10, reader=EVERYTHING)
        lat, recall = [], []
        with console.status(f"search {n:,}: ef={ef}..."):
            for q, t in zip(queries, truth, strict=True):
                t1 = time.perf_counter()
                hits = store.search(q, 10, reader=EVERYTHING)[0]
                lat.append(time.perf_counter() - t1)
                got = {int(h.chunk.id) for h in hits}
                recall.append(len(got & set(t.tolist())) / 10)
        st = Stats.of(lat)
        rows_out.append(
            {
                "ef": ef,
                "ef_effective": schema.search_params(s.milvus.index, s.milvus.search, store.fetch_size(10))[
                    "params"
                ]["ef"],
                "p50_ms": round(st.p50_ms, 2),
                "p95_ms": round(st.p95_ms, 2),
                "recall_at_10": round(float(np.mean(recall)), 4),
                "p50_speedup_vs_exact": round(exact.p50_ms / st.p50_ms, 2),
            }
        )
    store.close()
    _drop(settings)
    result = {
        "vectors": n,
        "dim": dim,
        "queries": n_queries,
        "index": "HNSW M=16 efConstruction=200",
        "insert_s": round(insert_s, 1),
        "index_build_s": round(index_s, 1),
        "baseline_exact_p50_ms": round(exact.p50_ms, 2),
        "baseline_exact_p95_ms": round(exact.p95_ms, 2),
        "hnsw": rows_out,
    }
    table = Table(
        title=f"search: {n:,} x {dim}-d, {n_queries} queries "
        f"(exact numpy p50 {exact.p50_ms:.1f} ms, insert {insert_s:.0f}s, index {index_s:.0f}s)"
    )
    for col in ("ef (effective)", "p50 ms", "p95 ms", "recall@10", "p50 speed-up vs exact"):
        table.add_column(col)
    for r in rows_out:
        table.add_row(
            f"{r['ef']} ({r['ef_effective']})",
            f"{r['p50_ms']:.2f}",
            f"{r['p95_ms']:.2f}",
            f"{r['recall_at_10']:.3f}",
            f"{r['p50_speedup_vs_exact']:.1f}x",
        )
    console.print(table)
    return result


def _wait_indexed(store: KnowledgeStore, n: int, timeout_s: float = 3600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = store.client.describe_index(store.collection, index_name=schema.VECTOR)
        if int(info.get("indexed_rows", n)) >= n and int(info.get("pending_index_rows", 0)) == 0:
            break
        time.sleep(2)
    # Milvus Lite compacts and builds indexes in a background worker after a
    # flush; a release + load waits for that work and loads the finished indexes.
    store.client.release_collection(store.collection)
    store.client.load_collection(store.collection)


# -- 3. gateway ----------------------------------------------------------------------------------


def bench_gateway(console: Console, base: Settings, stack: LocalStack, n_queries: int) -> dict[str, Any]:
    settings = _with(base, collection="bench_ingest")
    with console.status("gateway: starting..."):
        stack.start_gateway(gateway_env={"DUALTRACK_MILVUS__COLLECTION": "bench_ingest"})
    kb = KnowledgeBase(settings)
    kb.start()
    queries = [QUERIES[i % len(QUERIES)] for i in range(n_queries)]
    try:
        headers = {"Authorization": f"Bearer {stack.api_key()}"}
        direct, via, inner = [], [], []
        with httpx.Client(base_url=stack.gateway_url, headers=headers, timeout=60) as client:
            for q in queries[:10]:  # warm both paths
                kb.search(q)
                client.post("/v1/search", json={"query": q}).raise_for_status()
            # interleaved, so background work on this 2-core machine hits both paths alike
            for q in queries:
                t0 = time.perf_counter()
                kb.search(q)
                direct.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                r = client.post("/v1/search", json={"query": q})
                via.append(time.perf_counter() - t0)
                r.raise_for_status()
                inner.append(float(r.headers["server-timing"].split("dur=")[1]) / 1000)
    finally:
        kb.close()
    d, g = Stats.of(direct), Stats.of(via)
    own = Stats.of([v - i for v, i in zip(via, inner, strict=True)])
    result = {
        "queries": n_queries,
        "baseline_in_process_p50_ms": round(d.p50_ms, 2),
        "baseline_in_process_p95_ms": round(d.p95_ms, 2),
        "gateway_p50_ms": round(g.p50_ms, 2),
        "gateway_p95_ms": round(g.p95_ms, 2),
        "overhead_p50_ms": round(g.p50_ms - d.p50_ms, 2),
        "gateway_own_p50_ms": round(own.p50_ms, 2),
        "gateway_own_p95_ms": round(own.p95_ms, 2),
        "ratio_p50": round(g.p50_ms / d.p50_ms, 3),
    }
    table = Table(title=f"gateway: {n_queries} text queries (embed + search), keep-alive HTTP")
    for col in ("", "p50 ms", "p95 ms"):
        table.add_column(col)
    table.add_row("in-process (baseline)", f"{d.p50_ms:.2f}", f"{d.p95_ms:.2f}")
    table.add_row("through the gateway", f"{g.p50_ms:.2f}", f"{g.p95_ms:.2f}")
    table.add_row("difference", f"{g.p50_ms - d.p50_ms:.2f}", f"{g.p95_ms - d.p95_ms:.2f}")
    table.add_row("gateway's own time (HTTP, auth, JSON)", f"{own.p50_ms:.2f}", f"{own.p95_ms:.2f}")
    console.print(table)
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])
