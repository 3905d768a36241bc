"""Answers with citations.

``Answerer`` is the one interface the gateway calls; the LLM issue plugs a
model-backed answerer (with sensitivity routing and failover) in behind it.
Without an LLM, :class:`ExtractiveAnswerer` quotes the retrieved sentences
that are closest to the question, each tagged with its citation number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from services.kb.chunker import split_sentences
from services.kb.embedder import Embedder
from services.kb.models import Answer, Citation, Hit

NO_ANSWER = "I could not find anything about that in the knowledge base."


class Answerer(Protocol):
    """Turns a question and its retrieved passages into a cited answer."""

    def answer(self, question: str, hits: Sequence[Hit]) -> Answer: ...


def citations_for(hits: Sequence[Hit]) -> list[Citation]:
    """One numbered citation per hit, in rank order."""
    return [
        Citation(
            n=i,
            doc_id=h.chunk.doc_id,
            source=h.chunk.source,
            page=h.chunk.page or None,
            section=h.chunk.sections,
            chunk_id=h.chunk.id,
            score=round(h.score, 4),
            classification=h.chunk.classification,
            title=h.chunk.metadata.get("title"),
        )
        for i, h in enumerate(hits, start=1)
    ]


class ExtractiveAnswerer:
    """Best sentences from the top passages, each followed by ``[n]``."""

    route = "extractive"

    def __init__(self, embedder: Embedder, sentences: int = 3, passages: int = 5) -> None:
        self.embedder = embedder
        self.sentences = sentences
        self.passages = passages

    def answer(self, question: str, hits: Sequence[Hit]) -> Answer:
        hits = list(hits)[: self.passages]
        if not hits:
            return Answer(text=NO_ANSWER, citations=[], route=self.route)
        candidates: list[tuple[int, str]] = []
        seen: set[str] = set()  # overlapping chunks repeat sentences
        for n, hit in enumerate(hits, start=1):
            for line in hit.chunk.text.split("\n"):
                for sentence in split_sentences(line):
                    key = " ".join(sentence.lower().split())
                    if len(sentence.split()) >= 4 and key not in seen:
                        seen.add(key)
                        candidates.append((n, sentence))
        if not candidates:
            candidates = [(n, h.chunk.text) for n, h in enumerate(hits, start=1)]
        query = self.embedder.embed_query(question)
        sentence_vectors = self.embedder.embed_passages([s for _, s in candidates])
        # passage rank breaks ties and nudges toward the retriever's best hit
        rank_bonus = np.array([0.02 * (len(hits) - n) for n, _ in candidates], dtype=np.float32)
        scores = sentence_vectors @ query + rank_bonus
        best = sorted(np.argsort(-scores)[: self.sentences].tolist())
        best.sort(key=lambda i: (candidates[i][0], i))  # keep document order within a passage
        used: list[int] = []
        parts = []
        for i in best:
            n, sentence = candidates[i]
            parts.append(f"{sentence} [{n}]")
            if n not in used:
                used.append(n)
        cited = [c for c in citations_for(hits) if c.n in used]
        return Answer(text=" ".join(parts), citations=cited, route=self.route)
