"""Applying events to a real Milvus Lite store: idempotent, newest-wins, tombstones,
shipped vectors vs re-embedding. (The broker around it: test_consumer.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from services.kb.classification import Classification
from services.kb.errors import StoreTimeout
from services.kb.ingest import chunk_id
from services.kb.service import KnowledgeBase
from services.sync.apply import Applier
from services.sync.ledger import SyncLedger
from tests.services.sync.conftest import delete, unit_vectors, upsert


@pytest.fixture
def applier(kb: KnowledgeBase) -> Applier:
    return Applier(kb.settings, kb.store, kb.embedder)


def state(kb: KnowledgeBase, doc_id: str) -> tuple[str | None, int]:
    record = kb.store.get_document(doc_id)
    return (record.version if record else None, kb.store.count_chunks(doc_id))


def test_the_same_event_twice_is_one_state(kb: KnowledgeBase, applier: Applier) -> None:
    e = upsert("handbook", 10, ["Remote work needs a manager's approval.", "Laptops are encrypted."])
    assert [o.status for o in applier.apply([e])] == ["applied"]
    assert [o.status for o in applier.apply([e])] == ["duplicate"]
    assert [o.status for o in applier.apply([e, e])] == ["duplicate", "duplicate"]
    assert state(kb, "handbook") == (e.version, 2)
    ids = {c.id for c in kb.store.chunks_of("handbook", e.version)}
    assert ids == {chunk_id("handbook", e.version, n) for n in range(2)}


def test_an_older_version_never_overwrites_a_newer_one(kb: KnowledgeBase, applier: Applier) -> None:
    old = upsert("policy", 100, ["Old rule one.", "Old rule two.", "Old rule three."])
    new = upsert("policy", 200, ["New rule."])
    assert applier.apply([new])[0].status == "applied"
    outcome = applier.apply([old])[0]
    assert outcome.status == "stale" and "200" in (outcome.reason or "")
    assert state(kb, "policy") == (new.version, 1)
    # in one batch, in either order, the newest wins and nothing of the other is left
    fresh = upsert("policy2", 1, ["a."]), upsert("policy2", 2, ["b.", "c."])
    applier.apply([fresh[1], fresh[0]])
    assert state(kb, "policy2") == (fresh[1].version, 2)


def test_a_newer_version_replaces_every_chunk_of_the_old(kb: KnowledgeBase, applier: Applier) -> None:
    v1 = upsert("guide", 1, ["one.", "two.", "three."])
    v2 = upsert("guide", 2, ["only."])
    applier.apply([v1])
    applier.apply([v2])
    assert state(kb, "guide") == (v2.version, 1)


def test_a_delete_racing_an_upsert(kb: KnowledgeBase, applier: Applier) -> None:
    up = upsert("memo", 5, ["Quarterly numbers."])
    gone = delete("memo", 6)
    applier.apply([up])
    applier.apply([gone])
    assert state(kb, "memo") == (None, 0)
    # the upsert delivered again after the delete (a retry, a reordering): still gone
    assert applier.apply([up])[0].status == "stale"
    assert applier.apply([gone])[0].status == "duplicate"
    assert state(kb, "memo") == (None, 0)
    # the delete arriving before the upsert it follows: the upsert must not resurrect it
    applier.apply([delete("memo2", 9), upsert("memo2", 8, ["x."])])
    assert state(kb, "memo2") == (None, 0)
    ledger = SyncLedger(kb.store).get(["memo2"])["memo2"]
    assert ledger.deleted and ledger.revision == 9
    # a later upsert does bring it back
    back = upsert("memo", 7, ["Revised numbers."])
    assert applier.apply([back])[0].status == "applied"
    assert state(kb, "memo") == (back.version, 1)


def test_equal_revisions_are_ordered_by_origin(kb: KnowledgeBase, make_settings) -> None:
    shared = make_settings(milvus={"uri": kb.settings.milvus.uri}, sync={"shared_writers": ["*"]})
    applier = Applier(shared, kb.store, kb.embedder)
    a = upsert("shared", 50, ["from a."], origin="site-a")
    b = upsert("shared", 50, ["from b."], origin="site-b")
    applier.apply([b])
    assert applier.apply([a])[0].status == "stale"  # ("site-a" < "site-b")
    assert state(kb, "shared") == (b.version, 1)


def test_shipped_vectors_are_used_when_the_model_matches(kb: KnowledgeBase, applier: Applier) -> None:
    dim = kb.store.dimension
    shipped = unit_vectors(2, dim, seed=1)
    e = upsert("vec", 1, ["alpha.", "beta."], vectors=shipped, model=kb.embedder.model_id)
    applier.apply([e])
    assert applier.reembedded_chunks == 0
    rows = kb.store.client.query(
        kb.store.collection, filter='doc_id == "vec"', output_fields=["chunk_no", "embedding"]
    )
    stored = np.array([r["embedding"] for r in sorted(rows, key=lambda r: r["chunk_no"])], dtype=np.float32)
    np.testing.assert_allclose(stored, shipped, atol=1e-6)


def test_vectors_of_another_model_are_replaced_by_local_embeddings(
    kb: KnowledgeBase, applier: Applier
) -> None:
    dim = kb.store.dimension
    foreign = upsert(
        "foreign",
        1,
        ["Expense reports are due monthly."],
        vectors=unit_vectors(1, dim, 2),
        model="other/model",
    )
    applier.apply([foreign])
    assert applier.reembedded_chunks == 1
    hits = kb.search("When are expense reports due?", top_k=1)
    assert hits and hits[0].chunk.doc_id == "foreign" and hits[0].score > 0.5
    # a different dimension altogether: re-embedded too, not refused
    wide = upsert(
        "wide", 1, ["Badges open the east door."], vectors=unit_vectors(1, dim * 2, 3), model="big/model"
    )
    assert applier.apply([wide])[0].status == "applied"
    assert state(kb, "wide") == (wide.version, 1)


def test_confidential_from_another_site_is_refused_and_not_copied(
    kb: KnowledgeBase, applier: Applier
) -> None:
    secret = upsert("merger", 1, ["Project Falcon terms."], classification="confidential")
    outcome = applier.apply([secret])[0]
    assert outcome.status == "dead_letter" and outcome.sensitive
    assert "confidential" in (outcome.reason or "")
    assert state(kb, "merger") == (None, 0)
    # this site's own database (CDC) may hold its confidential rows
    assert applier.apply([secret], from_other_sites=False)[0].status == "applied"


def test_a_backup_carries_the_ledger_so_replays_after_a_restore_apply(
    kb: KnowledgeBase, applier: Applier, tmp_path
) -> None:
    from services.kb import backup

    v1 = upsert("runbook", 1, ["Restart the primary."])
    v2 = upsert("runbook", 2, ["Fail over to the replica."])
    applier.apply([v1])
    snap = backup.create(kb.settings.milvus, tmp_path / "backups", keep=3)
    assert backup.verify(snap)["counts"]["knowledge_base_sync"] == 1
    applier.apply([v2])
    backup.restore(kb.settings.milvus, snap, tmp_path / "backups")
    kb.store.close()
    assert state(kb, "runbook") == (v1.version, 1)
    # re-reading the topic after the restore: v1 is known (restored ledger), v2 applies again
    replay = Applier(kb.settings, kb.store, kb.embedder)
    assert [o.status for o in replay.apply([v1])] == ["duplicate"]
    assert [o.status for o in replay.apply([v2])] == ["applied"]
    assert state(kb, "runbook") == (v2.version, 1)


def test_a_refused_classification_removes_the_earlier_copy(make_settings, embedder) -> None:
    settings = make_settings(sync={"max_classification": "public"})
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    try:
        applier = Applier(settings, kb.store, kb.embedder)
        public = upsert("faq", 1, ["Opening hours are nine to five."], classification="public")
        assert applier.apply([public])[0].status == "applied"
        internal = upsert("faq", 2, ["Opening hours and the staff entrance code."], classification="internal")
        outcome = applier.apply([internal])[0]
        assert outcome.status == "dead_letter" and "above sync.max_classification public" in (
            outcome.reason or ""
        )
        assert not outcome.sensitive  # internal: the dead letter may carry it
        assert state(kb, "faq") == (None, 0)  # the public copy does not linger
        assert applier.apply([public])[0].status == "stale"
    finally:
        kb.close()


def test_a_released_ledger_after_a_milvus_restart_is_loaded_again(
    kb: KnowledgeBase, applier: Applier
) -> None:
    applier.apply([upsert("one", 1, ["first."])])
    kb.store.client.release_collection("knowledge_base_sync")  # as a restarted Milvus leaves it
    assert applier.apply([upsert("two", 1, ["second."])])[0].status == "applied"
    assert state(kb, "two")[1] == 1


def test_a_half_written_version_overtaken_after_a_crash_leaves_no_rows(
    kb: KnowledgeBase, applier: Applier
) -> None:
    """Simulate the crash: the ledger says v2 was being written and its rows are there,
    but neither the registry flip nor the final ledger entry happened; then v3 arrives."""
    from dataclasses import replace

    from services.kb.access import Acl
    from services.sync.apply import _chunks

    v1, v2, v3 = (upsert("doc", r, [f"rev {r} a.", f"rev {r} b.", f"rev {r} c."][: 4 - r]) for r in (1, 2, 3))
    applier.apply([v1])
    entry = applier.ledger.get(["doc"])["doc"]
    applier.ledger.put([replace(entry, writing=v2.version, writing_chunks=len(v2.chunks))])
    rows = _chunks(v2, Acl.everyone())
    kb.store.write_chunks(rows, unit_vectors(len(rows), kb.store.dimension, seed=5))
    assert kb.store.count_chunks("doc") == len(v1.chunks) + len(v2.chunks)
    assert applier.apply([v3])[0].status == "applied"
    assert state(kb, "doc") == (v3.version, 1)  # v1's and the orphaned v2's rows are gone


class Killed(BaseException):
    """The process dying at a given step (not an ``Exception``: nothing retries it)."""


def test_a_crash_after_the_registry_flip_leaves_no_rows_of_the_old_version(
    kb: KnowledgeBase, applier: Applier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between the registry flip and the delete of the old rows: the registry names
    only the new version and the ledger the one being written, so the replay must find the
    old rows some other way."""
    v1 = upsert("doc", 1, ["one a.", "one b.", "one c."])
    v2 = upsert("doc", 2, ["two a."])
    applier.apply([v1])

    def die(*_: object, **__: object) -> None:
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(kb.store, "delete_chunks", die)
        with pytest.raises(Killed):
            applier.apply([v2])
    assert kb.store.get_document("doc").version == v2.version  # the flip happened
    assert kb.store.count_chunks("doc") == len(v1.chunks) + len(v2.chunks)
    replay = Applier(kb.settings, kb.store, kb.embedder)
    assert replay.apply([v2])[0].status == "applied"
    assert state(kb, "doc") == (v2.version, 1)
    assert replay.ledger.get(["doc"])["doc"].writing == ""


def test_a_write_that_times_out_retries_the_batch_whole(own_milvus_server, make_settings, embedder) -> None:
    """A Milvus that does not answer in time (Milvus Lite sealing its in-memory rows takes
    seconds) is the store's trouble, not the events': the batch is handed back to be retried
    whole, never taken apart and dead-lettered. The write may have landed; the retry is the
    same idempotent write."""
    kb = KnowledgeBase(make_settings(milvus={"uri": own_milvus_server.uri}), embedder=embedder)
    kb.start()
    try:
        applier = Applier(kb.settings, kb.store, kb.embedder)
        applier.ledger.ensure()
        dim, model = kb.store.dimension, kb.embedder.model_id
        batch = [
            upsert(
                f"doc-{d}",
                1,
                [f"Paragraph {n} of document {d} about parking and visitors." for n in range(600)],
                vectors=unit_vectors(600, dim, seed=d),
                model=model,
            )
            for d in range(2)
        ]
        roomy = kb.store.settings
        kb.store.settings = roomy.model_copy(update={"write_timeout_s": 0.005})  # 1,200 chunks take longer
        with pytest.raises(StoreTimeout, match="milvus.write_timeout_s"):
            applier.apply(batch)
        kb.store.settings = roomy
        assert [o.status for o in applier.apply(batch)] == ["applied", "applied"]
        assert [state(kb, e.doc_id) for e in batch] == [(e.version, 600) for e in batch]
    finally:
        kb.close()


def _applier(kb: KnowledgeBase, make_settings, **sync) -> Applier:
    settings = make_settings(milvus={"uri": kb.settings.milvus.uri}, sync={"site_id": "site-b", **sync})
    return Applier(settings, kb.store, kb.embedder)


def test_a_shared_writer_edits_but_never_takes_a_document_over(kb: KnowledgeBase, make_settings) -> None:
    applier = _applier(kb, make_settings, shared_writers=["site-c"])
    statuses = [
        applier.apply([upsert("rota", 1, ["Site a drafted the rota."])])[0].status,
        applier.apply([upsert("rota", 2, ["Site c revised it."], origin="site-c")])[0].status,
        applier.apply([upsert("rota", 3, ["Site a revised it again."])])[0].status,  # still a's
    ]
    assert statuses == ["applied"] * 3
    assert kb.store.get_document("rota").metadata["synced_from"] == "site-a"
    # a shared writer's delete leaves no owner behind: the owner may bring the document back
    assert applier.apply([delete("rota", 4, origin="site-c")])[0].status == "applied"
    assert applier.apply([upsert("rota", 5, ["Back."])])[0].status == "applied"


def test_this_sites_own_documents_are_not_changed_from_outside(kb: KnowledgeBase, make_settings) -> None:
    """A document uploaded here and never published: not even a shared writer, nor an event
    claiming to be this site's own, changes it. This site's own database (CDC) is its own."""
    kb.ingestor.ingest_bytes(
        b"Salaries are paid on the 25th.",
        "payroll.md",
        doc_id="payroll",
        labels=[Classification.CONFIDENTIAL],
    )
    applier = _applier(kb, make_settings, shared_writers=["*"])
    outcomes = applier.apply(
        [
            upsert("payroll", 10**15, ["Public now."], origin="site-c"),
            delete("payroll", 10**15 + 1, origin="site-c"),
            upsert("payroll", 10**15 + 2, ["From 'us'."], origin="site-b"),
        ]
    )
    assert [o.status for o in outcomes] == ["dead_letter"] * 3
    assert "this site's own document, never published" in (outcomes[0].reason or "")
    assert "names this site ('site-b') as its origin" in (outcomes[2].reason or "")
    record = kb.store.get_document("payroll")
    assert record is not None and record.classification.value == "confidential"
    row = upsert("cdc-7", 5, ["A row of this site's database."], origin="cdc:public.articles")
    assert (
        applier.apply([upsert("cdc-7", 1, ["Site c got there first."], origin="site-c")])[0].status
        == "applied"
    )
    assert applier.apply([row], from_other_sites=False)[0].status == "applied"
    assert kb.store.get_document("cdc-7").metadata["synced_from"] == "cdc:public.articles"
