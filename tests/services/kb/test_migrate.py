"""Migrating a knowledge base created before access lists or before the BM25 index, in real
Milvus Lite, with the real `dualtrack kb migrate`: refused until migrated, every row kept, ACLs
from the rules, BM25 terms computed for every chunk, the originals kept, an interrupted swap
finished by a rerun."""

from __future__ import annotations

import json

from click.testing import Result
from pymilvus import CollectionSchema, DataType, MilvusClient
from typer.testing import CliRunner

from dualtrack.cli import app
from services.config import Settings
from services.kb import schema
from services.kb.access import EVERYTHING, Acl, Reader
from services.kb.classification import Classification
from services.kb.rows import plain, rows
from services.kb.service import KnowledgeBase
from tests.support import SAMPLES

RULES = [{"pattern": "confidential/*", "groups": ["legal"]}]


BEFORE_ACLS = schema.ACCESS_FIELDS
"""What collections created before documents carried access lists lack."""
BEFORE_KEYS = (schema.ACL_KEY,)
"""What collections created when ACLs were stored only as an array lack."""


def _without(current: CollectionSchema, dropped: tuple[str, ...]) -> CollectionSchema:
    """The schema as an earlier dualtrack created it."""
    legacy = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    for f in current.fields:
        if f.name not in dropped:
            extra = {"element_type": f.element_type} if f.dtype == DataType.ARRAY else {}
            legacy.add_field(f.name, f.dtype, is_primary=f.is_primary, **f.params, **extra)
    return legacy


def _legacy_site(
    make_settings, embedder, dropped: tuple[str, ...] = BEFORE_ACLS
) -> tuple[Settings, dict[str, int]]:
    """A knowledge base of the sample corpus, rewritten into collections of an older schema
    (in Milvus Lite, or the server tests are pointed at)."""
    settings = make_settings(
        milvus={"index": {"type": "FLAT", "metric": "COSINE"}}, access={"path_rules": RULES}
    )
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    for rel in ("handbook/employee-handbook.md", "confidential/project-falcon-acquisition.md"):
        assert kb.ingestor.ingest_path(SAMPLES / rel, root=SAMPLES).status == "ingested"
    client = kb.store.client
    names = {"kb": kb.store.collection, "registry": kb.store.registry}
    saved = {k: [plain(r) for r in rows(client, n)] for k, n in names.items()}
    kb.close()
    client = MilvusClient(settings.milvus.uri)
    # every release before the BM25 index kept dense-only chunk collections
    legacy_chunks = lambda: schema.chunk_schema(384, full_text=False)  # noqa: E731
    for key, builder in (("kb", legacy_chunks), ("registry", schema.registry_schema)):
        name = names[key]
        client.drop_collection(name)
        params = client.prepare_index_params()
        vector = schema.VECTOR if key == "kb" else schema.MARKER
        params.add_index(
            field_name=vector, index_type="FLAT", metric_type="L2" if key == "registry" else "COSINE"
        )
        client.create_collection(name, schema=_without(builder(), dropped), index_params=params)
        for r in saved[key]:
            for field in dropped:
                r.pop(field)
            if schema.ACL not in dropped:  # as that release wrote it: its own ACL, not the rules'
                r[schema.ACL] = ["group:finance"]
        client.insert(name, saved[key])
        client.flush(name)
    client.close()
    return settings, {names[k]: len(v) for k, v in saved.items()}


def _migrate(settings: Settings) -> Result:
    """`dualtrack kb migrate` in this process: Milvus Lite lets one process open a database."""
    env = {
        "DUALTRACK_MILVUS__URI": settings.milvus.uri,
        "DUALTRACK_MILVUS__COLLECTION": settings.milvus.collection,
        "DUALTRACK_MILVUS__INDEX__TYPE": "FLAT",
        "DUALTRACK_MILVUS__INDEX__METRIC": "COSINE",
        "DUALTRACK_ACCESS__PATH_RULES": json.dumps(RULES),
        "COLUMNS": "200",
    }
    return CliRunner().invoke(app, ["kb", "migrate"], env=env)


def test_an_old_collection_is_refused_then_migrated_without_loss(make_settings, embedder) -> None:
    settings, counts = _legacy_site(make_settings, embedder)
    name = settings.milvus.collection
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    ready = kb.readiness()
    assert not ready.milvus and "dualtrack kb migrate" in " ".join(ready.reasons)
    kb.close()

    done = _migrate(settings)
    assert done.exit_code == 0, done.output
    assert f"rows migrated; the original is {name}__premigration" in done.output

    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    try:
        docs = {d.doc_id: d for d in kb.store.list_documents(reader=EVERYTHING)}
        assert docs["confidential--project-falcon-acquisition.md"].acl == Acl.of(["legal"])
        assert docs["handbook--employee-handbook.md"].acl == Acl.everyone()
        assert sum(d.chunks for d in docs.values()) == counts[name] == kb.store.count_chunks()
        hits = kb.search("Which company does the Falcon acquisition target?", top_k=3, reader=EVERYTHING)
        assert hits and all(h.chunk.acl.entries for h in hits)
        legal = kb.search(
            "Falcon acquisition", top_k=20, reader=Reader(tuple(Classification), ("group:legal",))
        )
        assert {h.chunk.doc_id for h in legal} == {"confidential--project-falcon-acquisition.md"}
        names = kb.store.client.list_collections()
        assert {f"{name}__premigration", f"{name}_documents__premigration"} <= set(names)
    finally:
        kb.close()

    again = _migrate(settings)  # nothing left to do
    assert again.exit_code == 0 and "up to date" in again.output


def test_an_interrupted_swap_is_finished_by_a_rerun(make_settings, embedder) -> None:
    settings, counts = _legacy_site(make_settings, embedder)
    name = settings.milvus.collection
    assert _migrate(settings).exit_code == 0
    client = MilvusClient(settings.milvus.uri)
    client.rename_collection(name, name + "__migrating")  # as if stopped between the two renames
    client.close()
    done = _migrate(settings)
    assert done.exit_code == 0, done.output
    client = MilvusClient(settings.milvus.uri)
    try:
        client.load_collection(name)
        assert client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"] == counts[name]
        assert name + "__migrating" not in client.list_collections()
    finally:
        client.close()


def test_a_collection_with_acls_but_no_key_keeps_its_acls(make_settings, embedder) -> None:
    settings, counts = _legacy_site(make_settings, embedder, dropped=BEFORE_KEYS)
    name = settings.milvus.collection
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    ready = kb.readiness()
    assert not ready.milvus and "'acl_key'" in " ".join(ready.reasons)
    kb.close()
    done = _migrate(settings)
    assert done.exit_code == 0, done.output
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    try:
        docs = kb.store.list_documents(reader=EVERYTHING)
        assert [d.acl for d in docs] == [Acl.of(["finance"])] * 2  # kept, not replaced by the rules
        assert sum(d.chunks for d in docs) == counts[name] == kb.store.count_chunks()
        finance = Reader(tuple(Classification), ("*", "group:finance"))
        hits = kb.search("Falcon acquisition", top_k=5, reader=finance)
        assert len(hits) == 5 and all(h.chunk.acl == Acl.of(["finance"]) for h in hits)
        assert (
            kb.search("Falcon acquisition", top_k=5, reader=Reader(finance.labels, ("*", "group:legal")))
            == []
        )
    finally:
        kb.close()


def test_a_collection_without_the_bm25_index_is_refused_then_migrated(make_settings, embedder) -> None:
    settings, counts = _legacy_site(make_settings, embedder, dropped=())
    name = settings.milvus.collection
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    ready = kb.readiness()
    if not settings.milvus.full_text:  # an engine without BM25 (the 2.3 standalone): served as it is
        assert ready.milvus, ready.reasons
        kb.close()
        return
    reasons = " ".join(ready.reasons)
    assert not ready.milvus and "BM25" in reasons and "`dualtrack kb migrate`" in reasons
    kb.close()
    done = _migrate(settings)
    assert done.exit_code == 0, done.output
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    try:
        assert kb.readiness().ready
        assert kb.store.count_chunks() == counts[name]
        # every copied chunk has its BM25 terms: a keyword only one document has finds it
        found = kb.store.keyword_search(["Falcon"], 50, reader=EVERYTHING)[0]
        assert found and {h.chunk.doc_id for h in found} == {"confidential--project-falcon-acquisition.md"}
        assert len(found) == sum("falcon" in c.text.lower() for c in _all_chunks(kb))
    finally:
        kb.close()


def _all_chunks(kb: KnowledgeBase) -> list:
    return [
        c for d in kb.store.list_documents(reader=EVERYTHING) for c in kb.store.chunks_of(d.doc_id, d.version)
    ]
