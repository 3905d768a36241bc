"""The Milvus store against real Milvus Lite: embedded and server mode."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from services.config import ConfigError, load_settings
from services.kb import schema
from services.kb.access import EVERYTHING, Acl
from services.kb.classification import Classification
from services.kb.errors import SchemaMismatch, StoreTimeout, StoreUnavailable
from services.kb.filters import SearchFilter
from services.kb.models import Chunk
from services.kb.service import KnowledgeBase
from services.kb.store import KnowledgeStore, milvus_message
from tests.support import SAMPLES, free_port

SAMPLE_FILES = [
    p
    for p in sorted(SAMPLES.rglob("*"))
    if p.suffix in (".md", ".txt", ".html", ".pdf", ".docx") and p.name != "README.md"
]


def ingest_samples(kb: KnowledgeBase) -> dict[str, int]:
    out = {}
    for path in SAMPLE_FILES:
        r = kb.ingestor.ingest_path(path, SAMPLES)
        assert r.status == "ingested", r.reason
        out[r.doc_id] = r.chunks
    return out


def test_embedded_ingest_search_and_labels(kb: KnowledgeBase) -> None:
    chunks = ingest_samples(kb)
    assert kb.store.count_chunks() == sum(chunks.values())
    docs = {d.doc_id: d for d in kb.store.list_documents(reader=EVERYTHING)}
    assert docs["confidential--project-falcon-acquisition.md"].classification is Classification.CONFIDENTIAL
    assert docs["products--robot-fleet-faq.md"].classification is Classification.PUBLIC
    assert docs["policies--travel-and-expense-policy.pdf"].classification is Classification.INTERNAL

    hits = kb.search("What is the code name of the planned acquisition?", top_k=3)
    assert hits[0].chunk.doc_id == "confidential--project-falcon-acquisition.md"
    assert hits[0].score >= hits[-1].score

    public = kb.search(
        "What is the code name of the planned acquisition?",
        top_k=5,
        flt=SearchFilter(classifications=[Classification.PUBLIC]),
    )
    assert public and all(h.chunk.classification is Classification.PUBLIC for h in public)

    pdf_hit = kb.search("per diem allowance for a full day abroad", top_k=1)[0]
    assert pdf_hit.chunk.doc_id == "policies--travel-and-expense-policy.pdf"
    assert pdf_hit.chunk.page in (1, 2, 3)


def test_filter_injection_matches_nothing_and_changes_nothing(kb: KnowledgeBase) -> None:
    ingest_samples(kb)
    before = kb.store.count_chunks()
    evil = SearchFilter(sources=['" or 1==1 or source == "'], metadata={"department": '" or 1==1'})
    assert kb.search("vacation days", flt=evil) == []
    assert kb.store.count_chunks() == before
    # the same filter shape with a real value does match
    real = SearchFilter(sources=["handbook/employee-handbook.md"])
    assert {h.chunk.doc_id for h in kb.search("vacation days", flt=real)} == {
        "handbook--employee-handbook.md"
    }


def test_server_mode_and_hnsw_params_are_applied(milvus_server, embedder, make_settings) -> None:
    settings = make_settings(
        milvus={
            "uri": milvus_server.uri,
            "collection": "kb_server_hnsw",
            "index": {"type": "HNSW", "hnsw_m": 24},
        }
    )
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    try:
        ingest_samples(kb)
        client = MilvusClient(uri=milvus_server.uri)
        info = client.describe_index("kb_server_hnsw", index_name=client.list_indexes("kb_server_hnsw")[0])
        client.close()
        assert info["index_type"] == "HNSW"
        assert str(info.get("M", info.get("params", {}).get("M"))) == "24", info
        hits = kb.search("How do I promote the database replica?", top_k=3)
        assert hits[0].chunk.doc_id == "runbooks--database-failover.txt"
    finally:
        kb.close()


def test_ivf_flat_index_with_nprobe(make_settings, embedder) -> None:
    settings = make_settings(
        milvus={"index": {"type": "IVF_FLAT", "ivf_nlist": 4}, "search": {"ivf_nprobe": 4}}
    )
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    try:
        ingest_samples(kb)
        kb.store.flush()
        hits = kb.search("SEV1 incident paging on-call", top_k=3)
        assert hits[0].chunk.doc_id == "runbooks--incident-response.html"
    finally:
        kb.close()


@pytest.mark.parametrize("bad", ["IVF_PQ", "DISKANN", "hnsw2", "GPU_CAGRA"])
def test_unknown_index_type_is_refused_before_milvus(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(milvus={"index": {"type": bad}})
    msg = str(info.value)
    assert "milvus.index.type" in msg and repr(bad) in msg and "'HNSW', 'IVF_FLAT' or 'FLAT'" in msg


def test_wrong_dimension_for_existing_collection(make_settings, kb: KnowledgeBase) -> None:
    ingest_samples(kb)
    before = kb.store.count_chunks()
    kb.close()
    store = KnowledgeStore(make_settings().milvus, dimension=768)
    with pytest.raises(SchemaMismatch, match="stores 384-d vectors but the embedding model produces 768-d"):
        store.connect()
    kb.store.connect()
    assert kb.store.count_chunks() == before


def test_index_type_change_on_existing_collection_is_refused(make_settings, kb: KnowledgeBase) -> None:
    ingest_samples(kb)
    kb.close()
    store = KnowledgeStore(make_settings(milvus={"index": {"type": "IVF_FLAT"}}).milvus, dimension=384)
    with pytest.raises(
        SchemaMismatch, match="has a HNSW/COSINE index but milvus.index asks for IVF_FLAT/COSINE"
    ):
        store.connect()


def test_milvus_down_is_a_clear_error_and_not_ready(embedder, make_settings) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    store = KnowledgeStore(make_settings(milvus={"uri": uri}).milvus, dimension=384)
    with pytest.raises(StoreUnavailable, match=f"Milvus at {uri} is unreachable"):
        store.connect()
    kb = KnowledgeBase(make_settings(milvus={"uri": uri}), embedder=embedder)
    kb.start()  # does not raise
    r = kb.readiness()
    assert r.model and not r.milvus and not r.ready
    assert uri in r.reasons[0]


def test_search_rejects_wrong_query_dimension(kb: KnowledgeBase) -> None:
    with pytest.raises(ValueError, match="query vectors are 8-d; the store holds 384-d"):
        kb.store.search(np.zeros(8, dtype=np.float32), 3, reader=EVERYTHING)


def test_schema_is_defined_once() -> None:
    dense = [f.name for f in schema.chunk_schema(384, full_text=False).fields]
    assert [f.name for f in schema.chunk_schema(384).fields] == [*dense, schema.SPARSE]
    assert dense == [
        schema.ID,
        schema.DOC_ID,
        schema.VERSION,
        schema.CHUNK_NO,
        schema.TEXT,
        schema.VECTOR,
        schema.CLASSIFICATION,
        schema.SOURCE,
        schema.PAGE,
        schema.METADATA,
        schema.ACL,
        schema.ACL_KEY,
    ]


def test_score_threshold_and_top_k(kb: KnowledgeBase) -> None:
    ingest_samples(kb)
    query = "How do I promote the database replica?"
    ranked = kb.search(query, top_k=5)
    assert len(ranked) == 5
    order = [h.fused if kb.store.full_text else h.score for h in ranked]  # hybrid: in fused order
    assert order == sorted(order, reverse=True) and None not in order
    # the threshold is on cosine similarity in both modes: it keeps exactly the hits above it
    cut = sorted(h.score for h in ranked)[2] + 1e-6
    kept = kb.search(query, top_k=5, score_threshold=cut)
    assert {h.chunk.id for h in kept} == {h.chunk.id for h in ranked if h.score >= cut} and len(kept) == 2
    assert kb.search(query, score_threshold=0.999) == []


def test_citations_name_every_section_a_chunk_spans(kb: KnowledgeBase) -> None:
    ingest_samples(kb)
    answer = kb.answer("How many vacation days do full-time employees get?", kb.search("vacation days"))
    first = answer.citations[0]
    assert first.doc_id == "handbook--employee-handbook.md"
    assert "Vacation and Public Holidays" in (first.section or "")


def test_uri_credentials_never_reach_messages(make_settings) -> None:
    from services.kb.store import display_uri

    assert display_uri("http://root:s3cret@127.0.0.1:19530") == "http://127.0.0.1:19530"
    assert display_uri("/data/kb.db") == "/data/kb.db"
    uri = f"http://root:s3cret@127.0.0.1:{free_port()}"
    with pytest.raises(StoreUnavailable) as info:
        KnowledgeStore(make_settings(milvus={"uri": uri}).milvus, dimension=384).connect()
    assert "s3cret" not in str(info.value) and "127.0.0.1" in str(info.value)
    # a password with an unescaped "/" would read as a path, and be shown with the address
    with pytest.raises(ConfigError, match="percent-encode") as refused:
        make_settings(milvus={"uri": "http://root:s3/cret@127.0.0.1:19530"})
    assert "s3/cret" not in str(refused.value) and "cret" not in str(refused.value)


def test_column_wise_upserts_declare_each_field_once_and_refuse_ragged_rows(kb: KnowledgeBase) -> None:
    """Upserts go column by column, each column declaring its type from ``schema.FIELD_TYPES``:
    a name two collections share has one type, and rows that do not share their fields are
    refused before anything is sent (a column would silently lose a value)."""
    for collection in (schema.chunk_schema(384), schema.registry_schema(), schema.ledger_schema()):
        for f in collection.fields:
            assert schema.FIELD_TYPES[f.name] == f.dtype, f.name
    ledger = kb.store.ensure_ledger()
    row = {
        schema.DOC_ID: "a.md",
        schema.REVISION: 1,
        schema.ORIGIN: "site",
        schema.VERSION: "v1",
        schema.DELETED: False,
        schema.WRITING: "",
        schema.WRITING_CHUNKS: 0,
        schema.MARKER: [0.0] * schema.MARKER_DIM,
    }
    with pytest.raises(ValueError, match="must all have the fields"):
        kb.store.upsert(ledger, [row, {**row, schema.DOC_ID: "b.md", "extra": 1}])
    assert kb.store.client.query(ledger, filter="", output_fields=["count(*)"])[0]["count(*)"] == 0
    kb.store.upsert(ledger, [row, {**row, schema.DOC_ID: "b.md"}])
    assert kb.store.client.query(ledger, filter="", output_fields=["count(*)"])[0]["count(*)"] == 2


def test_a_write_past_its_deadline_is_a_timeout_in_the_store_s_words(
    own_milvus_server, make_settings
) -> None:
    """Over gRPC (a Milvus server), pymilvus hands a deadline on as a bare gRPC error; the store
    says which call, which setting bounds it and that the call may still land (a writer then
    retries it whole). 2,000 chunks take Milvus Lite far longer than 50 ms."""
    store = KnowledgeStore(make_settings(milvus={"uri": own_milvus_server.uri}).milvus, dimension=384)
    store.connect()
    try:
        # reads keep their own deadline: only writes get write_timeout_s
        store.settings = store.settings.model_copy(update={"write_timeout_s": 0.05})
        words = [
            "Parking",
            "is",
            "behind",
            "building",
            "B",
            "and",
            "visitors",
            "sign",
            "in",
            "at",
            "the",
            "front",
            "desk",
        ]
        rows = [
            Chunk(
                id=f"big-{n}",
                doc_id="big.md",
                version="v1",
                chunk_no=n,
                text=" ".join(words[(n + k) % len(words)] for k in range(120)),
                classification=Classification.INTERNAL,
                source="big.md",
                page=0,
                metadata={},
                acl=Acl.everyone(),
            )
            for n in range(2000)
        ]
        vectors = np.random.default_rng(0).normal(size=(len(rows), 384)).astype(np.float32)
        with pytest.raises(StoreTimeout) as info:
            store.write_chunks(
                rows, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), batch=len(rows)
            )
        message = str(info.value)
        assert message.startswith("Milvus upsert at ") and "milvus.write_timeout_s (0.05 s)" in message
        assert "Rendezvous" not in message and "debug_error_string" not in message
        # a read, under its own deadline, still answers: nothing of the write, or all of it
        assert store.count_chunks("big.md") in (0, len(rows))
    finally:
        store.close()


def test_store_messages_leave_out_the_channel_s_debug_text(own_milvus_server, make_settings) -> None:
    """pymilvus appends gRPC's debug string (peer address, core file and line) to the errors it
    gave up retrying; the store's messages, which reach HTTP answers and logs, leave it out.
    The gRPC error is a real one: 2,000 rows written to a real Milvus Lite server with a 5 ms
    deadline."""
    from pymilvus.decorators import _get_rpc_error_info

    store = KnowledgeStore(make_settings(milvus={"uri": own_milvus_server.uri}).milvus, dimension=384)
    store.connect()
    try:
        store.client.create_collection("probe_debug_text", dimension=4)
        rows = [{"id": n, "vector": [0.5] * 4} for n in range(2000)]
        with pytest.raises(grpc.RpcError) as info:
            store.client.insert("probe_debug_text", rows, timeout=0.005)
        raw = _get_rpc_error_info(info.value)  # what pymilvus puts in its retry-timeout message
        assert "debug=" in raw
        given_up = MilvusException(code=1, message=f"[insert] Retry timeout: 1s, {raw}")
        for exc in (info.value, given_up):
            told = milvus_message(exc)
            assert "DEADLINE_EXCEEDED" in told and "debug" not in told, told
    finally:
        store.close()
