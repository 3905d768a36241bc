"""Hybrid (dense + BM25) search in real Milvus: the filters apply to both lists, hostile queries
and documents get sane results with nothing stored changed, and an engine without BM25 is named
at start-up. Runs in Milvus Lite and again against Milvus standalone (`make test-standalone`),
where the 2.3 build has no BM25: there the collections are dense-only and the engine check runs."""

from __future__ import annotations

import pytest

from services.kb.access import EVERYTHING, Acl, Reader
from services.kb.classification import Classification
from services.kb.errors import EngineUnsupported
from services.kb.filters import SearchFilter
from services.kb.service import KnowledgeBase
from services.kb.store import _has_bm25
from tests.conftest import TEST_MILVUS_FULL_TEXT, TEST_MILVUS_URI
from tests.services.kb.test_store import ingest_samples

CODE = "ZQX-4471-B"
"""A product code only one document holds: what BM25 finds and vectors barely see."""


def _add(kb: KnowledgeBase, name: str, text: str, **kwargs) -> str:
    result = kb.ingestor.ingest_bytes(text.encode(), name, **kwargs)
    assert result.status == "ingested", result.reason
    return result.doc_id


def _hybrid(kb: KnowledgeBase) -> None:
    if not kb.store.full_text:
        pytest.skip("this engine keeps dense-only collections (see test_an_engine_without_bm25_is_named)")


def test_a_keyword_only_one_document_holds_is_found_first(kb: KnowledgeBase) -> None:
    _hybrid(kb)
    ingest_samples(kb)
    doc = _add(kb, "parts/catalogue.md", f"# Spare parts\n\nThe gripper replacement kit is part {CODE}.\n")
    first = kb.search(f"part number {CODE}", top_k=3)[0]
    assert first.chunk.doc_id == doc and first.fused is not None and -1.0 <= first.score <= 1.0
    keyword = kb.store.keyword_search([CODE], 5, reader=EVERYTHING)[0]
    assert keyword[0].chunk.doc_id == doc and keyword[0].score > keyword[1].score


def test_scope_and_client_filter_narrow_both_lists(kb: KnowledgeBase) -> None:
    _hybrid(kb)
    ingest_samples(kb)
    secret = _add(
        kb,
        "legal/parts.md",
        f"# Parts\n\nThe confidential kit {CODE} ships in May.\n",
        acls=[Acl.of(["legal"])],
    )
    public = _add(kb, "parts/catalogue.md", f"# Parts\n\nThe public kit {CODE} ships in June.\n")
    everyone = Reader(tuple(Classification), ("*",))
    legal = Reader(tuple(Classification), ("*", "group:legal"))
    # the BM25 list would rank the secret chunk first: the scope keeps it out of both lists
    assert secret not in {h.chunk.doc_id for h in kb.search(CODE, top_k=10, reader=everyone)}
    assert {secret, public} <= {h.chunk.doc_id for h in kb.search(CODE, top_k=10, reader=legal)}
    only = SearchFilter(doc_ids=[secret])
    assert {h.chunk.doc_id for h in kb.search(CODE, top_k=10, flt=only, reader=legal)} == {secret}
    assert kb.search(CODE, top_k=10, flt=only, reader=everyone) == []


def test_a_replaced_version_is_never_shown_by_either_list(kb: KnowledgeBase) -> None:
    _hybrid(kb)
    doc = _add(kb, "parts/catalogue.md", f"# Parts\n\nOld kit {CODE}.\n", doc_id="catalogue")
    _add(kb, "parts/catalogue.md", "# Parts\n\nThe kit was withdrawn.\n", doc_id="catalogue")
    assert kb.store.keyword_search([CODE], 5, reader=EVERYTHING)[0] == []
    assert all("Old kit" not in h.chunk.text for h in kb.search(CODE, top_k=5)), doc


@pytest.mark.parametrize(
    "query",
    [
        "the of and to it is",  # stop words only
        "?!... ;;; --- ***",  # punctuation only
        "Что говорит лицензия о гарантии?",  # other scripts  # noqa: RUF001
        "この文書の保証について",
        "ما هي شروط الترخيص",
        "\u202eevil\u202c\x07\x1b[31m",  # control characters and a right-to-left override
        "x" * 5000,
    ],
)
def test_hostile_queries_get_sane_results_and_change_nothing(kb: KnowledgeBase, query: str) -> None:
    ingest_samples(kb)
    before = kb.store.count_chunks()
    hits = kb.search(query, top_k=5)
    assert len(hits) <= 5 and all(-1.0 <= h.score <= 1.0 for h in hits)
    if kb.store.full_text:
        keyword = kb.store.keyword_search([query], 5, reader=EVERYTHING)[0]
        if query.startswith(("the of", "?!")):
            assert keyword == []  # no term left to match: BM25 finds nothing, dense still answers
        assert all(h.score > 0 for h in keyword)
    assert kb.store.count_chunks() == before


def test_hostile_documents_are_indexed_for_both_lists(kb: KnowledgeBase) -> None:
    _hybrid(kb)
    sentence = ("Clause " + " and ".join(f"party{i} agrees" for i in range(1500)))[:20_000]
    long_doc = _add(kb, "contracts/run-on.txt", sentence)
    hostile = _add(
        kb,
        "notes/hostile.txt",
        "\u202eevil\u202c " * 50 + "\x07\x1b[31m " * 2 + "Лицензия бесплатна. " + "مرحبا " * 40,
    )
    before = kb.store.count_chunks()
    binary = kb.ingestor.ingest_bytes(("\x07\x1b[31m " * 200).encode(), "notes/noise.txt")
    assert binary.status == "rejected" and "control characters" in (binary.reason or "")
    assert kb.store.count_chunks() == before
    # a term from the far end of the 20,000-character sentence is found, in a chunk the model read whole
    found = kb.store.keyword_search(["party990"], 3, reader=EVERYTHING)[0]
    assert found and found[0].chunk.doc_id == long_doc and "party990" in found[0].chunk.text
    assert kb.store.count_chunks(long_doc) > 1
    assert kb.store.keyword_search(["лицензия"], 3, reader=EVERYTHING)[0][0].chunk.doc_id == hostile


def test_an_engine_without_bm25_is_named(make_settings, embedder) -> None:
    assert _has_bm25("Milvus Lite") and _has_bm25("Milvus v2.5.14") and _has_bm25("Milvus v2.6.0")
    assert not _has_bm25("Milvus v2.3.5") and not _has_bm25("Milvus v2.4.17")
    if not TEST_MILVUS_URI or TEST_MILVUS_FULL_TEXT:
        pytest.skip("needs a Milvus without BM25: `make test-standalone` runs this against 2.3")
    kb = KnowledgeBase(make_settings(milvus={"full_text": True}), embedder=embedder)
    kb.start()
    try:
        reasons = " ".join(kb.readiness().reasons)
        assert "Milvus v2.3" in reasons and "no BM25" in reasons and "milvus.full_text = false" in reasons
        with pytest.raises(EngineUnsupported):
            kb.store.connect()
        assert kb.store.collection not in _collections(kb)  # nothing was created
    finally:
        kb.close()
    dense = KnowledgeBase(make_settings(milvus={"full_text": False}), embedder=embedder)
    dense.start()
    try:
        assert dense.readiness().ready
        ingest_samples(dense)
        assert dense.search("How do I promote the database replica?", top_k=3)
        with pytest.raises(EngineUnsupported, match="milvus.full_text is false"):
            dense.store.keyword_search(["replica"], 3, reader=EVERYTHING)
    finally:
        dense.close()


def _collections(kb: KnowledgeBase) -> list[str]:
    from pymilvus import MilvusClient

    client = MilvusClient(kb.settings.milvus.uri)
    try:
        return client.list_collections()
    finally:
        client.close()


def test_a_query_that_is_not_unicode_is_refused(kb: KnowledgeBase) -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        kb.search("budget \ud800 approval")
