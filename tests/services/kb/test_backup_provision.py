"""Backups and provisioning against real Milvus Lite: every chunk survives a round trip, a corrupt
backup is refused with the store untouched, retention keeps the newest, provisioning is idempotent."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from services.kb import backup, provision
from services.kb.access import EVERYTHING
from services.kb.service import KnowledgeBase
from tests.support import ingest_samples


def _snapshot_of(kb: KnowledgeBase) -> dict[str, tuple]:
    rows = kb.store.client.query(kb.store.collection, filter="", output_fields=["*"], limit=16384)
    return {r["id"]: (r["doc_id"], r["text"], tuple(round(x, 6) for x in r["embedding"])) for r in rows}


def test_backup_restore_round_trip_keeps_every_chunk(kb: KnowledgeBase, tmp_path: Path) -> None:
    ingest_samples(kb)
    before = _snapshot_of(kb)
    docs_before = {d.doc_id for d in kb.store.list_documents(reader=EVERYTHING)}
    assert len(before) > 20
    dest = tmp_path / "backups"
    snap = backup.create(kb.settings.milvus, dest, keep=3)
    manifest = backup.verify(snap)
    assert manifest["counts"][kb.store.collection] == len(before)
    assert manifest["dimension"] == 384 and not list(dest.glob(".*partial"))

    kb.store.delete_document(sorted(docs_before)[0])  # a loss after the backup
    damaged = len(_snapshot_of(kb))
    assert damaged < len(before)

    counts = backup.restore(kb.settings.milvus, snap, dest)
    assert counts[kb.store.collection] == len(before)
    kb.store.close()
    assert _snapshot_of(kb) == before
    assert {d.doc_id for d in kb.store.list_documents(reader=EVERYTHING)} == docs_before
    hits = kb.search("What is the code name of the planned acquisition?", top_k=1)
    assert hits[0].chunk.doc_id == "confidential--project-falcon-acquisition.md"
    (pre,) = dest.glob("pre-restore-*")  # what the restore replaced is kept
    assert backup.verify(pre)["counts"][kb.store.collection] == damaged


def test_chunks_written_after_a_restore_are_ranked_with_the_restored_ones(
    kb: KnowledgeBase, tmp_path: Path
) -> None:
    """BM25 ranks one collection: a passage written after a restore scores as its twin restored
    from the backup does. (Milvus Lite keeps BM25 statistics per segment: sealing the restored
    rows into a segment of their own made a fresh chunk score against itself alone.)"""
    passage = b"# Parking\n\nVisitors park on level minus two; the barrier opens with the visitor code.\n"
    ingest_samples(kb)
    kb.ingestor.ingest_bytes(passage, "restored-parking.md")
    dest = tmp_path / "backups"
    backup.restore(kb.settings.milvus, backup.create(kb.settings.milvus, dest, keep=3), dest)
    kb.store.close()
    kb.ingestor.ingest_bytes(passage, "fresh-parking.md")
    hits = kb.store.keyword_search(["Where do visitors park?"], 3, reader=EVERYTHING)[0]
    assert {h.chunk.doc_id for h in hits[:2]} == {"restored-parking.md", "fresh-parking.md"}, hits
    assert hits[0].score == pytest.approx(hits[1].score, rel=1e-3) and hits[1].score > 2 * hits[2].score


def test_corrupt_backup_is_refused_and_nothing_changes(kb: KnowledgeBase, tmp_path: Path) -> None:
    ingest_samples(kb)
    before = _snapshot_of(kb)
    snap = backup.create(kb.settings.milvus, tmp_path / "b", keep=3)
    data = snap / f"{kb.store.collection}.jsonl.gz"
    with gzip.open(data, "rt") as src:
        lines = src.read().splitlines()
    with gzip.open(data, "wt") as out:
        out.write("\n".join(lines[:-1]) + "\n")  # one chunk lost
    with pytest.raises(backup.BackupError, match="checksum"):
        backup.restore(kb.settings.milvus, snap, tmp_path / "b")
    manifest = json.loads((snap / "manifest.json").read_text())
    manifest["sha256"][data.name] = backup._sha256(data)  # a forged checksum: the row count still tells
    (snap / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(backup.BackupError, match="rows"):
        backup.restore(kb.settings.milvus, snap, tmp_path / "b")
    kb.store.close()
    assert _snapshot_of(kb) == before and not list((tmp_path / "b").glob("pre-restore-*"))


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    dest = tmp_path / "b"
    for stamp in ("20260101T000000Z", "20260102T000000Z", "20260103T000000Z"):
        (dest / f"kb-{stamp}").mkdir(parents=True)
    (dest / "pre-restore-20250101T000000Z").mkdir()
    removed = backup.prune(dest, keep=2)
    assert [p.name for p in removed] == ["kb-20260101T000000Z"]
    assert [p.name for p in backup.snapshots(dest)] == ["kb-20260102T000000Z", "kb-20260103T000000Z"]
    assert (dest / "pre-restore-20250101T000000Z").exists()


def test_provision_creates_collections_once_and_reports_lite_has_no_rbac(
    make_settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DUALTRACK_MILVUS__URI", str(tmp_path / "kb.db"))
    first = provision.provision(app_user="kb_app", dimension=384)
    assert first.changed and "knowledge_base" in " ".join(first.actions)
    assert "knowledge_base_sync" in " ".join(first.actions)  # the sync ledger, made by the admin
    assert first.rbac == "unavailable" and "firewall" in first.message
    second = provision.provision(app_user="kb_app", dimension=384)
    assert not second.changed and second.actions == []

    def no_model(*args, **kwargs):
        raise AssertionError("a re-run must not load the embedding model")

    monkeypatch.setattr("services.kb.embedder.Embedder", no_model)
    third = provision.provision(app_user="kb_app", dimension=None)  # size read from the collection
    assert not third.changed
