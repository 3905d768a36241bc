"""Migrating a knowledge base created before access lists or before the BM25 index, in real
Milvus Lite, with the real `dualtrack kb migrate`: refused until migrated, every row kept, ACLs
from the rules, BM25 terms computed for every chunk, the originals kept, an interrupted swap
finished by a rerun."""

from __future__ import annotations

import json
import threading
import time

from click.testing import Result
from pymilvus import CollectionSchema, DataType, MilvusClient
from typer.testing import CliRunner

from dualtrack.cli import app
from services.config import Settings
from services.kb import backup, schema
from services.kb.access import EVERYTHING, Acl, Reader
from services.kb.classification import Classification
from services.kb.ingest import embedding_text
from services.kb.rows import plain, rows
from services.kb.service import KnowledgeBase
from services.sync.apply import Applier
from tests.services.kb.test_store import SAMPLE_FILES
from tests.services.sync.conftest import upsert
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
        "DUALTRACK_MILVUS__FULL_TEXT": json.dumps(settings.milvus.full_text),
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


def test_a_collection_from_before_the_bm25_index_is_rebuilt_while_it_serves(
    make_settings, embedder, tmp_path
) -> None:
    """The release before: long chunks (a 650-token budget, of which the model read its window),
    no BM25 field. The gateway serves it dense while `dualtrack kb migrate` rebuilds it into a new
    collection and switches the alias; searches run throughout and never come back empty."""
    from dualtrack.bench_retrieval import long_chunks

    settings = make_settings(
        milvus={"index": {"type": "FLAT", "metric": "COSINE"}, "acl_refresh_s": 0.2},
        access={"path_rules": RULES},
    )
    old = settings.model_copy(
        update={
            "milvus": settings.milvus.model_copy(update={"full_text": False}),
            "chunking": settings.chunking.model_copy(update={"min_tokens": 260, "overlap_tokens": 40}),
        }
    )
    legacy = KnowledgeBase(old, embedder=long_chunks(embedder))
    legacy.start()
    for path in SAMPLE_FILES:
        assert legacy.ingestor.ingest_path(path, root=SAMPLES).status == "ingested"
    before = {d.doc_id: d for d in legacy.store.iter_documents()}
    legacy_chunks = legacy.store.count_chunks()
    legacy.close()

    serving = KnowledgeBase(settings, embedder=embedder)
    serving.start()
    try:
        ready = serving.readiness()
        if not settings.milvus.full_text:  # an engine without BM25 (the 2.3 standalone): nothing to rebuild
            assert ready.ready and not ready.notes
            return
        assert ready.ready and "`dualtrack kb migrate`" in " ".join(ready.notes)
        question = "How do I promote the replica when the primary database fails?"
        assert serving.search(question, top_k=3)[0].chunk.doc_id == "runbooks--database-failover.txt"

        results: list[int] = []
        stop = threading.Event()

        def keep_searching() -> None:
            while not stop.is_set():
                results.append(len(serving.search(question, top_k=3)))

        reader = threading.Thread(target=keep_searching)
        reader.start()
        try:
            done = _migrate(settings)
        finally:
            stop.set()
            reader.join()
        assert done.exit_code == 0, done.output
        assert "rebuilt into" in done.output and "switched" in done.output, done.output
        assert results and 0 not in results  # served throughout, never empty

        time.sleep(0.3)  # the store notices the BM25 index within milvus.acl_refresh_s
        hits = serving.search(question, top_k=3)
        assert hits[0].chunk.doc_id == "runbooks--database-failover.txt" and hits[0].fused is not None
        assert serving.readiness().notes == []
        after = {d.doc_id: d for d in serving.store.iter_documents()}
        assert after.keys() == before.keys()
        for doc_id, record in after.items():
            assert record.version == serving.ingestor.version_now(record) != before[doc_id].version
            chunks = serving.store.chunks_of(doc_id, record.version)
            assert len(chunks) == record.chunks
            counts = embedder.window.count([embedding_text(c) for c in chunks])
            assert max(counts) <= embedder.window.window  # nothing past the window any more
        assert serving.store.count_chunks() > legacy_chunks
        # every rebuilt chunk has its BM25 terms
        found = serving.store.keyword_search(["Falcon"], 50, reader=EVERYTHING)[0]
        assert found and {h.chunk.doc_id for h in found} == {"confidential--project-falcon-acquisition.md"}
        # the text survived the re-chunking: each old sentence is still in its document
        restored = " ".join(
            c.text
            for c in serving.store.chunks_of(
                "handbook--employee-handbook.md", after["handbook--employee-handbook.md"].version
            )
        )
        assert "Vacation" in restored

        # sync keeps applying, now into the rebuilt collection behind the alias
        event = upsert("synced-note", 5, ["The lab opens at nine.", "Badges are checked at the door."])
        applier = Applier(serving.settings, serving.store, serving.embedder)
        assert [o.status for o in applier.apply([event])] == ["applied"]
        assert serving.store.count_chunks("synced-note", event.version) == 2
        # a backup of the rebuilt knowledge base restores, replacing the alias's collection
        total = serving.store.count_chunks()
        snap = backup.create(settings.milvus, tmp_path / "backups", keep=2)
        assert backup.verify(snap)["counts"][settings.milvus.collection] == total
        serving.store.delete_document("synced-note")
        serving.store.close()
        counts = backup.restore(settings.milvus, snap, tmp_path / "backups", settings.access)
        assert counts[settings.milvus.collection] == total
        assert serving.store.count_chunks("synced-note") == 2
        assert serving.search(question, top_k=1)[0].chunk.doc_id == "runbooks--database-failover.txt"
    finally:
        serving.close()
    again = _migrate(settings)
    assert again.exit_code == 0 and "up to date" in again.output, again.output
