"""The rebuild behind `dualtrack kb migrate` (services/kb/relayout.py), in real Milvus Lite, at
its awkward moments: text that repeats itself, a run stopped between the rename and the alias,
a writer landing at the switch or in the instant before a relabel flip, a model change."""

from __future__ import annotations

import copy
import re

import pytest
from pymilvus import MilvusClient

from dualtrack.bench_retrieval import long_chunks
from services.config import Settings
from services.kb import relayout as relayout_module
from services.kb import schema
from services.kb.access import Acl, Reader
from services.kb.classification import Classification
from services.kb.errors import SchemaMismatch
from services.kb.relayout import recovered_blocks, relayout
from services.kb.service import KnowledgeBase
from tests.services.kb.test_store import SAMPLE_FILES
from tests.support import SAMPLES

LEGACY_CHUNKING = {"min_tokens": 260, "overlap_tokens": 40}


def _old_release(make_settings, embedder, files=SAMPLE_FILES) -> Settings:
    """A knowledge base as the release before wrote it: long chunks, no BM25 field; the
    settings of the current release pointed at it."""
    settings = make_settings(milvus={"index": {"type": "FLAT", "metric": "COSINE"}, "acl_refresh_s": 0.1})
    if not settings.milvus.full_text:
        pytest.skip("this engine has no BM25: there is nothing to rebuild into")
    old = settings.model_copy(
        update={
            "milvus": settings.milvus.model_copy(update={"full_text": False}),
            "chunking": settings.chunking.model_copy(update=LEGACY_CHUNKING),
        }
    )
    legacy = KnowledgeBase(old, embedder=long_chunks(embedder))
    legacy.start()
    for path in files:
        assert legacy.ingestor.ingest_path(path, root=SAMPLES).status == "ingested"
    legacy.close()
    return settings


def _words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


def test_recovered_text_loses_nothing(kb: KnowledgeBase) -> None:
    prose = (SAMPLES / "handbook/employee-handbook.md").read_bytes()
    refrain = ("# Drill\n\n" + "Close valve A now. " * 120).encode()
    for name, data in (("prose.md", prose), ("refrain.md", refrain)):
        result = kb.ingestor.ingest_bytes(data, name)
        chunks = kb.store.chunks_of(result.doc_id, result.version)
        assert len(chunks) > 2
        stored = [w for c in chunks for w in _words(c.text)]
        recovered = [w for b in recovered_blocks(chunks) for w in _words(b.text)]
        # nothing the chunks hold is missing; overlaps are removed (prose: exactly)
        assert set(recovered) == set(stored) and len(recovered) <= len(stored)
        if name == "prose.md":
            text = " ".join(_words(" ".join(b.text for b in recovered_blocks(chunks))))
            assert all(" ".join(_words(c.text)) in text for c in chunks)
        else:
            assert recovered.count("valve") >= 120  # a refrain keeps every repeat (at worst more)


def test_a_switch_stopped_between_rename_and_alias_is_finished(make_settings, embedder, monkeypatch) -> None:
    settings = _old_release(make_settings, embedder)
    real = MilvusClient.create_alias

    def crash(self, *args, **kwargs):
        raise RuntimeError("stopped between the rename and the alias")

    monkeypatch.setattr(MilvusClient, "create_alias", crash)
    with pytest.raises(RuntimeError):
        relayout(settings, embedder)
    monkeypatch.setattr(MilvusClient, "create_alias", real)
    gateway = KnowledgeBase(settings, embedder=embedder)  # a gateway starting now creates nothing
    gateway.start()
    assert "run it again to finish the switch" in " ".join(gateway.readiness().reasons)
    with pytest.raises(SchemaMismatch):
        gateway.store.connect()
    gateway.close()
    done = relayout(settings, embedder)
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    try:
        assert kb.readiness().ready and done.chunks_after == kb.store.count_chunks() > 0
        alias = kb.store.client.describe_alias(settings.milvus.collection)["collection_name"]
        assert alias == schema.generation_name(settings.milvus.collection, 1)
        assert (
            kb.search("How do I promote the replica?", top_k=1)[0].chunk.doc_id
            == "runbooks--database-failover.txt"
        )
    finally:
        kb.close()


def test_a_document_written_at_the_switch_is_carried_over(make_settings, embedder, monkeypatch) -> None:
    settings = _old_release(make_settings, embedder)
    serving = KnowledgeBase(settings, embedder=embedder)
    serving.start()
    real = relayout_module._Relayout._switch

    def switch(self, live: str, target: str) -> str:  # verified; the alias has not moved yet
        note = b"# Lab\n\nThe cryogenic freezer alarm code is QX-7781. Call facilities at once.\n"
        assert serving.ingestor.ingest_bytes(note, "notes/lab.md").status == "ingested"
        return real(self, live, target)

    monkeypatch.setattr(relayout_module._Relayout, "_switch", switch)
    try:
        relayout(settings, embedder)
        record = serving.store.get_document("notes--lab.md")
        assert (
            record is not None
            and serving.store.count_chunks("notes--lab.md", record.version) == record.chunks
        )
        hits = serving.search("cryogenic freezer alarm code QX-7781", top_k=1)
        assert hits[0].chunk.doc_id == "notes--lab.md"
    finally:
        serving.close()


def test_a_writer_in_the_instant_before_a_relabel_flip_keeps_its_access_list(
    make_settings, embedder, monkeypatch
) -> None:
    settings = make_settings(milvus={"index": {"type": "FLAT", "metric": "COSINE"}})
    text = b"# Falcon\n\nProject Falcon will acquire Northwind for 40 million. The board votes in May. " * 3
    old = settings.model_copy(update={"chunking": settings.chunking.model_copy(update=LEGACY_CHUNKING)})
    legacy = KnowledgeBase(old, embedder=embedder)
    legacy.start()
    assert legacy.ingestor.ingest_bytes(text, "notes/falcon.md").status == "ingested"
    legacy.close()
    gateway = KnowledgeBase(settings, embedder=embedder)
    gateway.start()
    real = relayout_module.KnowledgeStore.get_document
    fired: list[str] = []

    def get_document(store, doc_id):  # the relabel's check returns, then the admin's write lands
        record = real(store, doc_id)
        if store is not gateway.store and not fired:
            narrowed = gateway.ingestor.ingest_bytes(text, "notes/falcon.md", acls=[Acl.of(["legal"])])
            fired.append(narrowed.version or "")
        return record

    monkeypatch.setattr(relayout_module.KnowledgeStore, "get_document", get_document)
    try:
        done = relayout(settings, embedder)
        monkeypatch.setattr(relayout_module.KnowledgeStore, "get_document", real)
        record = gateway.store.get_document("notes--falcon.md")
        assert fired and done.relabelled == 0
        assert record.acl == Acl.of(["legal"]) and record.version == fired[0]
        assert gateway.store.count_chunks("notes--falcon.md", record.version) == record.chunks
        eve = Reader(tuple(Classification), ("*", "user:eve"))
        assert gateway.store.list_documents(reader=eve) == []
        assert gateway.search("Falcon acquisition Northwind", top_k=3, reader=eve) == []
    finally:
        gateway.close()


def test_a_model_change_embeds_again(make_settings, embedder) -> None:
    settings = make_settings()
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    for path in SAMPLE_FILES[:2]:
        assert kb.ingestor.ingest_path(path, root=SAMPLES).status == "ingested"
    kb.close()
    other = copy.copy(embedder)
    other.model_id = embedder.model_id + "-retrained"  # same vectors' shape, another model's name
    done = relayout(settings, other)
    # same text, same chunks: but the vectors are another model's, so none are reused
    assert done.relabelled == 2 and done.reembedded == 2
    again = relayout(settings, other)
    assert again.relabelled == 0 and again.reembedded == 0
