"""Migrating a knowledge base created before access lists, in real Milvus Lite, with the real
`dualtrack kb migrate`: refused until migrated, every row kept, ACLs from the rules, the
originals kept, an interrupted swap finished by a rerun."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import Result
from pymilvus import CollectionSchema, MilvusClient
from typer.testing import CliRunner

from dualtrack.cli import app
from services.kb import schema
from services.kb.access import EVERYTHING, Acl
from services.kb.rows import plain, rows
from services.kb.service import KnowledgeBase
from tests.support import SAMPLES

RULES = [{"pattern": "confidential/*", "groups": ["legal"]}]
NAME = "knowledge_base"


def _without_acl(current: CollectionSchema) -> CollectionSchema:
    """The schema as dualtrack created it before documents carried access lists."""
    legacy = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    for f in current.fields:
        if f.name != schema.ACL:
            legacy.add_field(f.name, f.dtype, is_primary=f.is_primary, **f.params)
    return legacy


def _legacy_site(make_settings, embedder, tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A knowledge base of the sample corpus, rewritten into collections of the old schema."""
    kb = KnowledgeBase(make_settings(), embedder=embedder)
    kb.start()
    for rel in ("handbook/employee-handbook.md", "confidential/project-falcon-acquisition.md"):
        assert kb.ingestor.ingest_path(SAMPLES / rel, root=SAMPLES).status == "ingested"
    client = kb.store.client
    names = {"kb": kb.store.collection, "registry": kb.store.registry}
    saved = {k: [plain(r) for r in rows(client, n)] for k, n in names.items()}
    kb.close()
    old = tmp_path / "old.db"
    client = MilvusClient(str(old))
    for key, builder in (("kb", lambda: schema.chunk_schema(384)), ("registry", schema.registry_schema)):
        name = names[key]
        params = client.prepare_index_params()
        vector = schema.VECTOR if key == "kb" else schema.MARKER
        params.add_index(
            field_name=vector, index_type="FLAT", metric_type="L2" if key == "registry" else "COSINE"
        )
        client.create_collection(name, schema=_without_acl(builder()), index_params=params)
        for r in saved[key]:
            r.pop(schema.ACL)
        client.insert(name, saved[key])
        client.flush(name)
    client.close()
    return old, {names[k]: len(v) for k, v in saved.items()}


def _migrate(db: Path) -> Result:
    """`dualtrack kb migrate` in this process: Milvus Lite lets one process open a database."""
    env = {
        "DUALTRACK_MILVUS__URI": str(db),
        "DUALTRACK_MILVUS__INDEX__TYPE": "FLAT",
        "DUALTRACK_MILVUS__INDEX__METRIC": "COSINE",
        "DUALTRACK_ACCESS__PATH_RULES": json.dumps(RULES),
        "COLUMNS": "200",
    }
    return CliRunner().invoke(app, ["kb", "migrate"], env=env)


def test_an_old_collection_is_refused_then_migrated_without_loss(make_settings, embedder, tmp_path) -> None:
    old, counts = _legacy_site(make_settings, embedder, tmp_path)
    settings = make_settings(
        milvus={"uri": str(old), "index": {"type": "FLAT", "metric": "COSINE"}}, access={"path_rules": RULES}
    )
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    ready = kb.readiness()
    assert not ready.milvus and "dualtrack kb migrate" in " ".join(ready.reasons)
    kb.close()

    done = _migrate(old)
    assert done.exit_code == 0, done.output
    assert "rows migrated; the original is knowledge_base__pre_acl" in done.output

    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    try:
        docs = {d.doc_id: d for d in kb.store.list_documents(reader=EVERYTHING)}
        assert docs["confidential--project-falcon-acquisition.md"].acl == Acl.of(["legal"])
        assert docs["handbook--employee-handbook.md"].acl == Acl.everyone()
        assert sum(d.chunks for d in docs.values()) == counts[NAME] == kb.store.count_chunks()
        hits = kb.search("Which company does the Falcon acquisition target?", top_k=3, reader=EVERYTHING)
        assert hits and all(h.chunk.acl.entries for h in hits)
        names = kb.store.client.list_collections()
        assert {"knowledge_base__pre_acl", "knowledge_base_documents__pre_acl"} <= set(names)
    finally:
        kb.close()

    again = _migrate(old)  # nothing left to do
    assert again.exit_code == 0 and "up to date" in again.output


def test_an_interrupted_swap_is_finished_by_a_rerun(make_settings, embedder, tmp_path) -> None:
    old, counts = _legacy_site(make_settings, embedder, tmp_path)
    assert _migrate(old).exit_code == 0
    client = MilvusClient(str(old))
    client.rename_collection(NAME, NAME + "__migrating")  # as if stopped between the two renames
    client.close()
    done = _migrate(old)
    assert done.exit_code == 0, done.output
    client = MilvusClient(str(old))
    try:
        client.load_collection(NAME)
        assert client.query(NAME, filter="", output_fields=["count(*)"])[0]["count(*)"] == counts[NAME]
        assert NAME + "__migrating" not in client.list_collections()
    finally:
        client.close()
