"""``dualtrack bench retrieval``: does search find the answer, and what does hybrid cost?

Each question set names, per question, the document that answers it and (the public set) an
evidence phrase copied from it. Every set is ingested twice into Milvus Lite, once per chunking:

``window``  chunks sized to the embedder's window (the product's chunker as configured);
``long``    chunks of up to 650 tokens (about 500 words, the bound chunks had when they were
            counted in words), of which the model reads its window only: the earlier layout,
            emulated by the same chunker with a larger budget.

and each is searched three ways on the same collection: ``dense`` (vectors only), ``bm25``
(Milvus' BM25 function only) and ``hybrid`` (both, fused by the configured ranker). Reported per
variant: hit@1 and hit@3 (the answering document among the first 1 or 3 hits), MRR@10, and
*answer in context*: whether the text the LLM would receive (the top ``retrieval.top_k`` chunks)
holds the evidence phrase, alone and with each hit's neighbouring chunks added. Plus the share
of chunk text past the embedder's window (never embedded), and the per-query latency of dense
vs hybrid search (query embedding excluded: it is the same for both).
"""

from __future__ import annotations

import copy
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml
from rich.console import Console
from rich.table import Table

from dualtrack.bench import machine
from services.config import Settings, load_settings
from services.kb.access import EVERYTHING
from services.kb.embedder import Embedder
from services.kb.ingest import doc_id_for, embedding_text
from services.kb.models import Hit
from services.kb.retriever import ranker
from services.kb.service import KnowledgeBase

ROOT = Path(__file__).resolve().parent.parent
Mode = Literal["dense", "bm25", "hybrid"]
MODES: tuple[Mode, ...] = ("dense", "bm25", "hybrid")
LONG_TOKENS = 650
"""The ``long`` chunking's budget: about 500 words, the old word bound's maximum."""
DEPTH = 10
"""Hits read per question (MRR@10)."""


@dataclass(frozen=True)
class Question:
    question: str
    doc: str
    """The answering document, relative to its set's corpus."""
    kind: str
    evidence: str | None = None


@dataclass(frozen=True)
class QuestionSet:
    name: str
    corpus: Path
    questions: tuple[Question, ...]
    pattern: str = "*"
    """Which files of ``corpus`` are its documents."""

    @classmethod
    def load(cls, name: str, corpus: Path, path: Path, pattern: str = "*") -> QuestionSet:
        items = yaml.safe_load(path.read_text())
        questions = tuple(
            Question(
                question=q["question"],
                doc=q["doc"],
                kind=q.get("kind", "paraphrase"),
                evidence=q.get("evidence"),
            )
            for q in items
        )
        missing = sorted({q.doc for q in questions if not (corpus / q.doc).is_file()})
        if missing:
            raise ValueError(f"question set {name!r}: documents not in {corpus}: {', '.join(missing)}")
        return cls(name, corpus, questions, pattern)

    def files(self) -> list[Path]:
        documents = {".txt", ".md", ".pdf", ".docx", ".html"}
        return sorted(p for p in self.corpus.rglob(self.pattern) if p.suffix in documents)


def question_sets() -> dict[str, QuestionSet]:
    public = ROOT / "benchmarks" / "retrieval"
    return {
        "public": QuestionSet.load("public", public / "corpus", public / "questions.yaml", "*.txt"),
        "samples": QuestionSet.load(
            "samples", ROOT / "docs" / "samples", ROOT / "tests/data/retrieval_questions.yaml"
        ),
    }


@dataclass(frozen=True)
class Scores:
    questions: int
    hit1: float
    hit3: float
    mrr10: float
    in_context: float | None
    """Share of questions whose evidence is in the top-k chunks' text (None: the set has none)."""
    in_context_neighbours: float | None
    """The same with each hit's neighbouring chunks (same document, chunk number +-1) added."""
    by_kind: dict[str, dict[str, float]]


@dataclass(frozen=True)
class Layout:
    chunks: int
    unseen_chunks: float
    """Share of chunks longer than the embedder's window."""
    unseen_text: float
    """Share of all chunk tokens past the window: text dense search never sees."""


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _searcher(kb: KnowledgeBase, mode: Mode) -> Callable[[str, int], list[Hit]]:
    store, rank = kb.store, ranker(kb.settings.retrieval)

    def search(query: str, limit: int) -> list[Hit]:
        if mode == "bm25":
            return store.keyword_search([query], limit, reader=EVERYTHING)[0]
        vector = kb.embedder.embed_query(query)
        if mode == "dense":
            return store.search(vector, limit, reader=EVERYTHING)[0]
        return store.hybrid_search(vector, query, limit, rank, reader=EVERYTHING)

    return search


def score(kb: KnowledgeBase, qs: QuestionSet, mode: Mode) -> Scores:
    """The set's questions against ``kb``, searched as ``mode``."""
    search = _searcher(kb, mode)
    context_k = kb.settings.retrieval.top_k
    neighbours = _Neighbours(kb)
    rows: list[tuple[str, float, float, float, float | None, float | None]] = []
    for q in qs.questions:
        hits = search(q.question, DEPTH)
        want = doc_id_for(q.doc)
        docs = [h.chunk.doc_id for h in hits]
        rank = docs.index(want) + 1 if want in docs else None
        seen: float | None = None
        seen_more: float | None = None
        if q.evidence:
            evidence = normalise(q.evidence)
            top = hits[:context_k]
            seen = float(any(evidence in normalise(h.chunk.text) for h in top))
            seen_more = float(evidence in normalise(" ".join(neighbours.context(top))))
        rows.append(
            (
                q.kind,
                float(rank == 1),
                float(rank is not None and rank <= 3),
                1.0 / rank if rank else 0.0,
                seen,
                seen_more,
            )
        )

    def mean(values: Sequence[float | None]) -> float | None:
        got = [v for v in values if v is not None]
        return round(statistics.fmean(got), 4) if got else None

    kinds = sorted({r[0] for r in rows})
    return Scores(
        questions=len(rows),
        hit1=mean([r[1] for r in rows]) or 0.0,
        hit3=mean([r[2] for r in rows]) or 0.0,
        mrr10=mean([r[3] for r in rows]) or 0.0,
        in_context=mean([r[4] for r in rows]),
        in_context_neighbours=mean([r[5] for r in rows]),
        by_kind={
            k: {
                "hit1": mean([r[1] for r in rows if r[0] == k]) or 0.0,
                "hit3": mean([r[2] for r in rows if r[0] == k]) or 0.0,
                "mrr10": mean([r[3] for r in rows if r[0] == k]) or 0.0,
            }
            for k in kinds
        },
    )


class _Neighbours:
    """The chunks either side of a hit, in document order: what a context widened by
    neighbours would give the LLM."""

    def __init__(self, kb: KnowledgeBase) -> None:
        self.kb = kb
        self.docs: dict[tuple[str, str], dict[int, str]] = {}

    def context(self, hits: Sequence[Hit]) -> list[str]:
        out: list[str] = []
        for h in hits:
            c = h.chunk
            key = (c.doc_id, c.version)
            if key not in self.docs:
                self.docs[key] = {x.chunk_no: x.text for x in self.kb.store.chunks_of(c.doc_id, c.version)}
            texts = self.docs[key]
            out.extend(texts[n] for n in (c.chunk_no - 1, c.chunk_no, c.chunk_no + 1) if n in texts)
        return out


def layout(kb: KnowledgeBase, embedder: Embedder) -> Layout:
    """How much of the stored chunk text ``embedder`` (the model itself) reads."""
    window = embedder.window
    real = window.window
    counts: list[int] = []
    for doc in kb.store.iter_documents():
        counts.extend(window.count([embedding_text(c) for c in kb.store.chunks_of(doc.doc_id, doc.version)]))
    total = sum(counts) or 1
    return Layout(
        chunks=len(counts),
        unseen_chunks=round(sum(n > real for n in counts) / max(len(counts), 1), 4),
        unseen_text=round(sum(max(n - real, 0) for n in counts) / total, 4),
    )


def latency(kb: KnowledgeBase, qs: QuestionSet, rounds: int) -> dict[str, float]:
    """p50/p95 of one dense and one hybrid search per question, interleaved, ``rounds`` times
    (query vectors embedded once beforehand: both modes need the same one)."""
    store, rank, k = kb.store, ranker(kb.settings.retrieval), kb.settings.retrieval.top_k
    queries = [q.question for q in qs.questions]
    vectors = kb.embedder.embed_queries(queries)
    dense: list[float] = []
    hybrid: list[float] = []
    for _ in range(rounds):
        for text, vector in zip(queries, vectors, strict=True):
            t = time.perf_counter()
            store.search(vector, k, reader=EVERYTHING)
            dense.append(time.perf_counter() - t)
            t = time.perf_counter()
            store.hybrid_search(vector, text, k, rank, reader=EVERYTHING)
            hybrid.append(time.perf_counter() - t)

    def pct(xs: list[float], p: float) -> float:
        return round(float(sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]) * 1000, 2)

    return {
        "searches": len(dense),
        "dense_p50_ms": pct(dense, 0.5),
        "dense_p95_ms": pct(dense, 0.95),
        "hybrid_p50_ms": pct(hybrid, 0.5),
        "hybrid_p95_ms": pct(hybrid, 0.95),
        "hybrid_cost_p50_ms": round(pct(hybrid, 0.5) - pct(dense, 0.5), 2),
    }


def long_chunks(embedder: Embedder) -> Embedder:
    """``embedder`` as the chunker of the earlier layout saw it: a 650-token budget. The model
    itself still reads only its own window, so the rest of each long chunk goes unembedded."""
    legacy = copy.copy(embedder)
    legacy.window = replace(embedder.window, window=LONG_TOKENS)
    return legacy


CHUNKINGS = ("window", "long")


def build(settings: Settings, embedder: Embedder, qs: QuestionSet, chunking: str, db: Path) -> KnowledgeBase:
    """A knowledge base of ``qs``' corpus in a fresh Milvus Lite database at ``db``."""
    milvus = settings.milvus.model_copy(update={"uri": str(db), "collection": "bench"})
    chunk_cfg = settings.chunking
    if chunking == "long":
        chunk_cfg = chunk_cfg.model_copy(update={"max_tokens": None, "min_tokens": 260, "overlap_tokens": 40})
    cfg = settings.model_copy(update={"milvus": milvus, "chunking": chunk_cfg})
    kb = KnowledgeBase(cfg, embedder=embedder if chunking == "window" else long_chunks(embedder))
    kb.start()
    for path in qs.files():
        result = kb.ingestor.ingest_path(path, root=qs.corpus)
        if result.status != "ingested":
            kb.close()
            raise ValueError(f"{qs.name}: {result.name} was not ingested: {result.reason}")
    kb.store.flush()
    return kb


def measure(
    settings: Settings,
    embedder: Embedder,
    qs: QuestionSet,
    work: Path,
    *,
    chunkings: Sequence[str] = CHUNKINGS,
    modes: Sequence[Mode] = MODES,
    latency_rounds: int = 0,
) -> dict[str, Any]:
    """Every chunking x mode variant of one question set, in this run."""
    result: dict[str, Any] = {"questions": len(qs.questions), "documents": len(qs.files()), "variants": {}}
    for chunking in chunkings:
        kb = build(settings, embedder, qs, chunking, work / f"{qs.name}-{chunking}.db")
        try:
            result.setdefault("layout", {})[chunking] = asdict(layout(kb, embedder))
            for mode in modes:
                result["variants"][f"{chunking}/{mode}"] = asdict(score(kb, qs, mode))
            if latency_rounds and chunking == "window":
                result["latency"] = latency(kb, qs, latency_rounds)
        finally:
            kb.close()
    return result


def run_retrieval_bench(
    console: Console, *, sets: Sequence[str], out: Path | None, workdir: Path | None, rounds: int
) -> dict[str, Any]:
    available = question_sets()
    unknown = [s for s in sets if s not in available]
    if unknown:
        raise ValueError(f"unknown question set(s) {', '.join(unknown)}; choose from {', '.join(available)}")
    settings = load_settings()
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["dualtrack", *sys.argv[1:]]) if sys.argv else "",
        "machine": machine(),
        "milvus": f"Milvus Lite {metadata.version('milvus-lite')} (embedded)",
        "embedding_model": settings.embedding.model,
        "fusion": settings.retrieval.fusion,
        "sets": {},
    }
    embedder = Embedder(settings.embedding)
    with ExitStack() as cleanup:
        work = workdir or Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="dualtrack-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        for name in sets:
            console.print(f"[bold]{name}[/]: ingesting and searching every variant")
            report["sets"][name] = measure(settings, embedder, available[name], work, latency_rounds=rounds)
            _print(console, name, report["sets"][name])
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"results written to {out}")
    return report


def _print(console: Console, name: str, result: dict[str, Any]) -> None:
    table = Table(title=f"{name}: {result['questions']} questions over {result['documents']} documents")
    for col in ("chunking/mode", "hit@1", "hit@3", "MRR@10", "in context", "+neighbours"):
        table.add_column(col, justify="right")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for variant, s in result["variants"].items():
        table.add_row(
            variant,
            fmt(s["hit1"]),
            fmt(s["hit3"]),
            fmt(s["mrr10"]),
            fmt(s["in_context"]),
            fmt(s["in_context_neighbours"]),
        )
    console.print(table)
    for chunking, lay in result["layout"].items():
        console.print(
            f"  {chunking}: {lay['chunks']} chunks, {lay['unseen_chunks']:.1%} longer than the window, "
            f"{lay['unseen_text']:.1%} of chunk text never embedded"
        )
    if "latency" in result:
        lat = result["latency"]
        console.print(
            f"  latency over {lat['searches']} searches: dense p50 {lat['dense_p50_ms']} ms, hybrid p50 "
            f"{lat['hybrid_p50_ms']} ms (cost {lat['hybrid_cost_p50_ms']:+} ms)"
        )
