"""Retrieval quality on the shipped corpus with the real offline model:
for questions written against the sample documents, the right document must
be among the top-3 hits for at least 90% of them."""

from __future__ import annotations

import yaml

from services.kb.ingest import doc_id_for
from services.kb.service import KnowledgeBase
from tests.services.kb.test_store import ingest_samples
from tests.support import ROOT


def test_right_document_in_top3_for_90_percent(kb: KnowledgeBase) -> None:
    ingest_samples(kb)
    questions = yaml.safe_load((ROOT / "tests/data/retrieval_questions.yaml").read_text())
    assert len(questions) >= 30
    misses = []
    for q in questions:
        hits = kb.search(q["question"], top_k=3)
        if doc_id_for(q["doc"]) not in {h.chunk.doc_id for h in hits}:
            misses.append((q["question"], q["doc"], [h.chunk.doc_id for h in hits]))
    rate = 1 - len(misses) / len(questions)
    print(f"top-3 document hit rate: {rate:.1%} ({len(questions) - len(misses)}/{len(questions)})")
    assert rate >= 0.9, misses
