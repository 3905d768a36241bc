"""Retrieval quality with the real offline model in real Milvus Lite: on the sample corpus the
right document is among the top-3 hits for at least 90% of the questions; on the harder public
set (``dualtrack bench retrieval``'s) the current pipeline clears thresholds the earlier one
misses, measured in the same run."""

from __future__ import annotations

import json

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


GATE = {"hit3": 0.88, "mrr10": 0.80, "hit1": 0.72}
"""What retrieval must reach on the public question set (72 questions, 34 documents): chunks
sized to the embedder, searched hybrid. The earlier pipeline (long chunks the model read only
the head of, dense search) measures below every one of them in the same run."""


def test_the_public_set_tells_the_pipelines_apart(make_settings, embedder, tmp_path) -> None:
    from dualtrack.bench_retrieval import measure, question_sets

    qs = question_sets()["public"]
    assert len(qs.questions) >= 60 and len(qs.files()) >= 30
    result = measure(make_settings(), embedder, qs, tmp_path, modes=("dense", "hybrid"))
    new, old = result["variants"]["window/hybrid"], result["variants"]["long/dense"]
    print(json.dumps({"new": new, "old": old, "layout": result["layout"]}, indent=1))
    for metric, floor in GATE.items():
        assert new[metric] >= floor, (metric, new[metric])
        assert old[metric] < floor, (metric, old[metric])
    # what the BM25 leg is for: keyword questions find their document more often than by vectors
    dense = result["variants"]["window/dense"]
    assert new["by_kind"]["keyword"]["hit3"] > dense["by_kind"]["keyword"]["hit3"]
    # the chunker's point: nothing past the window, where the long chunks left half the text unseen
    assert result["layout"]["window"]["unseen_text"] == 0.0 < 0.3 < result["layout"]["long"]["unseen_text"]
