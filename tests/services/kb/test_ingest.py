"""Re-ingest is atomic per document, unchanged documents are skipped, deletes
are complete -- against real Milvus Lite, including a kill -9 mid-ingest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from services.kb.ingest import Ingestor, chunk_id
from services.kb.service import KnowledgeBase
from services.kb.store import KnowledgeStore
from tests.support import ROOT, SAMPLES


def document(version: str, sentences: int = 120) -> bytes:
    """A document whose every sentence names its version, so hits reveal it."""
    body = " ".join(
        f"Release {version} note {i}: the conveyor robot model {i % 7} uses firmware {version}."
        for i in range(sentences)
    )
    return f"# Firmware notes\n\n{body}\n".encode()


def versions_seen(kb: KnowledgeBase, query: str = "which firmware does the conveyor robot use") -> set[str]:
    return {h.chunk.version for h in kb.search(query, top_k=20)}


def test_unchanged_is_skipped_and_changed_replaces(kb: KnowledgeBase) -> None:
    ing = kb.ingestor
    first = ing.ingest_bytes(document("v1"), "notes.md")
    assert first.status == "ingested" and first.chunks > 1
    again = ing.ingest_bytes(document("v1"), "notes.md")
    assert again.status == "skipped" and again.reason == "unchanged" and "embed" not in again.timings

    second = ing.ingest_bytes(document("v2", sentences=60), "notes.md")
    assert second.status == "ingested" and second.version != first.version
    assert kb.store.count_chunks("notes.md") == second.chunks
    assert kb.store.count_chunks("notes.md", first.version) == 0
    assert versions_seen(kb) == {second.version}
    assert all("v2" in h.chunk.text for h in kb.search("firmware", top_k=10))


def test_chunk_ids_are_stable_across_stores(make_settings, embedder, tmp_path: Path) -> None:
    ids = []
    for name in ("a.db", "b.db"):
        settings = make_settings(milvus={"uri": str(tmp_path / name)})
        store = KnowledgeStore(settings.milvus, embedder.dimension)
        res = Ingestor(settings, embedder, store).ingest_bytes(document("v1"), "notes.md")
        ids.append([c.id for c in store.chunks_of("notes.md", res.version)])
        assert ids[-1][0] == chunk_id("notes.md", res.version, 0)
        store.close()
    assert ids[0] == ids[1]


def test_relabel_reingests(kb: KnowledgeBase) -> None:
    from services.kb.classification import Classification

    a = kb.ingestor.ingest_bytes(document("v1"), "notes.md")
    b = kb.ingestor.ingest_bytes(document("v1"), "notes.md", labels=[Classification.CONFIDENTIAL])
    assert b.status == "ingested" and b.version != a.version
    assert {h.chunk.classification for h in kb.search("firmware")} == {Classification.CONFIDENTIAL}


def test_delete_removes_every_chunk(kb: KnowledgeBase) -> None:
    kb.ingestor.ingest_bytes(document("v1"), "notes.md")
    kb.ingestor.ingest_bytes(document("x", 10), "other.md")
    assert kb.ingestor.delete("notes.md") is True
    assert kb.store.count_chunks("notes.md") == 0
    assert kb.store.get_document("notes.md") is None
    assert {h.chunk.doc_id for h in kb.search("firmware")} == {"other.md"}
    assert kb.ingestor.delete("notes.md") is False


def test_failure_mid_write_keeps_old_version_whole(kb: KnowledgeBase, monkeypatch) -> None:
    old = kb.ingestor.ingest_bytes(document("v1"), "notes.md")
    original = kb.store.write_chunks

    def write_half_then_die(chunks, vectors, batch=256):
        original(chunks[: len(chunks) // 2], vectors[: len(chunks) // 2], batch)
        raise RuntimeError("simulated crash after a partial write")

    monkeypatch.setattr(kb.store, "write_chunks", write_half_then_die)
    with pytest.raises(RuntimeError):
        kb.ingestor.ingest_bytes(document("v2"), "notes.md")
    assert kb.store.count_chunks("notes.md") > old.chunks  # orphans of v2 exist ...
    assert versions_seen(kb) == {old.version}  # ... but search never shows them
    assert kb.store.get_document("notes.md").version == old.version

    monkeypatch.setattr(kb.store, "write_chunks", original)
    new = kb.ingestor.ingest_bytes(document("v2"), "notes.md")
    assert kb.store.count_chunks("notes.md") == new.chunks  # orphans and old version gone


def test_search_during_reingest_sees_only_old_version(kb: KnowledgeBase, monkeypatch) -> None:
    old = kb.ingestor.ingest_bytes(document("v1"), "notes.md")
    seen: list[set[str]] = []
    original = kb.store.activate

    def observe_then_activate(record):
        seen.append(versions_seen(kb))  # all new chunks are written, not yet active
        original(record)
        seen.append(versions_seen(kb))  # flipped, old chunks not yet purged

    monkeypatch.setattr(kb.store, "activate", observe_then_activate)
    new = kb.ingestor.ingest_bytes(document("v2"), "notes.md")
    assert seen == [{old.version}, {new.version}]


def test_same_document_ingested_twice_concurrently(kb: KnowledgeBase) -> None:
    results = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        results.append(kb.ingestor.ingest_bytes(document("v1"), "notes.md"))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status for r in results) == ["ingested", "skipped"]
    chunks = results[0].chunks
    assert kb.store.count_chunks("notes.md") == chunks
    ids = [c.id for c in kb.store.chunks_of("notes.md", results[0].version)]
    assert len(ids) == len(set(ids)) == chunks


CRASHER = textwrap.dedent(
    """
    import sys
    from services.config import load_settings
    from services.kb.service import KnowledgeBase
    settings = load_settings(milvus={"uri": sys.argv[1], "collection": "crash_kb"},
                             ingest={"insert_batch": 4})
    kb = KnowledgeBase(settings)
    kb.start()
    original = kb.store.write_chunks
    def slow(chunks, vectors, batch):
        for i in range(0, len(chunks), batch):
            original(chunks[i:i + batch], vectors[i:i + batch], batch)
            print("wrote", i + batch, flush=True)
    kb.store.write_chunks = slow
    kb.ingestor.ingest_bytes(open(sys.argv[2], "rb").read(), "notes.md")
    print("finished", flush=True)
    """
)


def test_kill_9_mid_ingest_leaves_old_version_searchable(milvus_server, embedder, make_settings, tmp_path):
    settings = make_settings(milvus={"uri": milvus_server.uri, "collection": "crash_kb"})
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    old = kb.ingestor.ingest_bytes(document("v1"), "notes.md")
    v2 = tmp_path / "v2.md"
    v2.write_bytes(document("v2", sentences=400))
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, milvus_server.uri, str(v2)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait until part of v2 is written, then kill -9
        if line.startswith("wrote") or time.monotonic() > deadline:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    partial = kb.store.count_chunks("notes.md")
    assert partial > old.chunks, "the crash should have left partial v2 rows behind"
    assert kb.store.get_document("notes.md").version == old.version
    assert versions_seen(kb) == {old.version}
    assert len(kb.store.chunks_of("notes.md", old.version)) == old.chunks

    done = kb.ingestor.ingest_bytes(v2.read_bytes(), "notes.md")  # a rerun finishes the job
    assert done.status == "ingested"
    assert kb.store.count_chunks("notes.md") == done.chunks
    assert versions_seen(kb) == {done.version}
    kb.close()


def test_a_failing_change_listener_never_fails_the_local_write(kb, caplog) -> None:
    """The publisher runs after the write succeeded: its failure is logged, not returned."""

    class BrokenListener:
        def document_written(self, *args: object) -> None:
            raise RuntimeError("broker exploded")

        def document_deleted(self, *args: object) -> None:
            raise RuntimeError("broker exploded")

    kb.listener = BrokenListener()
    result = kb.ingestor.ingest_bytes(b"# Parking\n\nVisitors park on level two.", "parking.md")
    assert result.status == "ingested" and kb.store.get_document(result.doc_id) is not None
    assert kb.ingestor.delete(result.doc_id) is True
    assert kb.store.get_document(result.doc_id) is None
    assert caplog.text.count("publish it later with `dualtrack sync publish-existing`") == 2


def test_no_stored_chunk_is_past_the_embedders_window(kb: KnowledgeBase) -> None:
    """Every chunk of every sample document, and of documents built to strain the chunker, is
    embedded whole: its text with its title/section head fits what the model reads."""
    from services.kb.ingest import embedding_text
    from tests.support import ingest_samples

    assert ingest_samples(kb) >= 7
    long_title = "Master Services Agreement between the Bank and its Processor, " * 4
    strained = {
        "one-sentence.md": ("# Clause\n\n" + " and ".join(f"party {i} agrees" for i in range(1500)) + ".\n"),
        "long-title.md": f"---\ntitle: {long_title}\n---\n# {long_title}\n\n"
        + "A short rule applies. " * 300,
        "many-sections.md": "".join(
            f"## Section {i}\n\n" + "Text of the section. " * 30 + "\n\n" for i in range(20)
        ),
        "codes.txt": " ".join(f"ACCT-{i:06d}-ZX" for i in range(3000)),
    }
    for name, text in strained.items():
        assert kb.ingestor.ingest_bytes(text.encode(), name).status == "ingested", name
    window = kb.embedder.window
    docs = list(kb.store.iter_documents())
    chunks = [c for d in docs for c in kb.store.chunks_of(d.doc_id, d.version)]
    assert len(docs) >= 11 and len(chunks) > 60
    counts = window.count([embedding_text(c) for c in chunks])
    assert max(counts) <= window.window, max(zip(counts, (c.doc_id for c in chunks), strict=True))


def test_a_title_that_is_not_unicode_is_rejected_and_nothing_stored(kb: KnowledgeBase) -> None:
    """A lone surrogate (JSON can carry one as an escape) is refused with a reason, before the
    tokenizer that sizes chunks would fail on it."""
    result = kb.ingestor.ingest_bytes(b"# Notes\n\nSome text.\n", "notes.md", title="bad \ud800 title")
    assert result.status == "rejected" and "not valid Unicode" in (result.reason or "")
    assert kb.store.get_document("notes.md") is None


def test_a_batch_writes_like_one_document_at_a_time(kb: KnowledgeBase, make_settings, embedder) -> None:
    from services.kb.ingest import Upload

    files = sorted(p for p in SAMPLES.rglob("*") if p.suffix in {".md", ".txt", ".html", ".pdf", ".docx"})
    uploads = [
        Upload(p.read_bytes(), p.relative_to(SAMPLES).as_posix()) for p in files if p.name != "README.md"
    ]
    batched = kb.ingestor.ingest_many(uploads)
    assert [r.status for r in batched] == ["ingested"] * len(uploads)
    single = KnowledgeBase(make_settings(milvus={"collection": "one_by_one"}), embedder=embedder)
    single.start()
    try:
        one = [single.ingestor.ingest_bytes(u.data, u.source) for u in uploads]
        # the same versions and chunk counts as the one-at-a-time path, and the same rows
        assert [(r.doc_id, r.version, r.chunks) for r in batched] == [
            (r.doc_id, r.version, r.chunks) for r in one
        ]
        assert kb.store.count_chunks() == single.store.count_chunks() == sum(r.chunks for r in one)
    finally:
        single.close()
    again = kb.ingestor.ingest_many(uploads)
    assert {r.status for r in again} == {"skipped"} and all("embed" not in r.timings for r in again)

    # a changed, a corrupt and the same document twice in one batch
    before = kb.store.count_chunks()
    mixed = kb.ingestor.ingest_many(
        [
            Upload(document("v1"), "notes.md"),
            Upload(b"%PDF-1.7 broken", "broken.pdf"),
            Upload(document("v2", sentences=60), "notes.md"),
            uploads[0],
        ]
    )
    assert [r.status for r in mixed] == ["ingested", "rejected", "ingested", "skipped"]
    assert kb.store.get_document("notes.md").version == mixed[2].version  # the later entry wins
    assert kb.store.count_chunks("notes.md") == mixed[2].chunks
    assert kb.store.count_chunks() == before + mixed[2].chunks
    seen = versions_seen(kb)
    assert mixed[2].version in seen and mixed[0].version not in seen


def test_a_batch_that_fails_mid_write_keeps_every_old_version(kb: KnowledgeBase, monkeypatch) -> None:
    from services.kb.ingest import Upload

    old = kb.ingestor.ingest_many([Upload(document("v1"), "a.md"), Upload(document("v1"), "b.md")])
    original = kb.store.write_chunks

    def write_half_then_die(chunks, vectors, batch=256, **kwargs):
        original(chunks[: len(chunks) // 2], vectors[: len(chunks) // 2], batch)
        raise RuntimeError("simulated crash after a partial write")

    monkeypatch.setattr(kb.store, "write_chunks", write_half_then_die)
    with pytest.raises(RuntimeError):
        kb.ingestor.ingest_many([Upload(document("v2"), "a.md"), Upload(document("v2"), "b.md")])
    assert {kb.store.get_document(d).version for d in ("a.md", "b.md")} == {old[0].version}
    assert versions_seen(kb) == {old[0].version}
    monkeypatch.setattr(kb.store, "write_chunks", original)
    new = kb.ingestor.ingest_many([Upload(document("v2"), "a.md"), Upload(document("v2"), "b.md")])
    assert kb.store.count_chunks() == sum(r.chunks for r in new)
