"""The seed's ORM code keeps working against the server-mode store.

The seed connects with ``connections.connect``, opens
``Collection("knowledge_base")`` and builds an IVF_FLAT/L2 index (nlist 128)
on the ``embedding`` field. Here it does that on the collection our store
created and filled, and both sides keep reading the same data afterwards.
"""

from __future__ import annotations

import time

import pytest
from pymilvus import Collection, MilvusException, connections

from services.kb.service import KnowledgeBase
from tests.services.kb.test_store import ingest_samples

pytestmark = pytest.mark.filterwarnings("ignore:.*ORM-style PyMilvus API")

SEED_INDEX = {"index_type": "IVF_FLAT", "metric_type": "L2", "params": {"nlist": 128}}


@pytest.fixture
def orm(milvus_server):
    # milvus-lite's gRPC server keeps gRPC's default ping policy (a ping per 5 minutes without
    # calls) while pymilvus pings every 10 s: an idle connection of an earlier test to the same
    # server is sent GOAWAY "too many pings", and a new channel that shares its subchannel can
    # fail its first call with it. The seed connects once; here it may take a second try.
    for attempt in range(3):
        try:
            connections.connect("default", host="127.0.0.1", port=str(milvus_server.port))
            break
        except MilvusException:
            if attempt == 2:
                raise
            time.sleep(1)
    yield
    connections.disconnect("default")


def test_seed_orm_snippet_on_the_store_collection(milvus_server, embedder, make_settings, orm) -> None:
    settings = make_settings(
        milvus={
            "uri": milvus_server.uri,
            "collection": "knowledge_base",
            "index": {"type": "IVF_FLAT", "metric": "L2", "ivf_nlist": 128},
        }
    )
    kb = KnowledgeBase(settings, embedder=embedder)
    kb.start()
    try:
        ingest_samples(kb)
        stored = kb.store.count_chunks()
        kb.store.flush()

        # --- the seed's code, unchanged in substance ---
        collection = Collection("knowledge_base")
        collection.release()
        # Milvus >= 2.4 refuses a second index on a field; the vector's index is named for its field
        # (the collection also has the BM25 one, so the name must be given)
        collection.drop_index(index_name="embedding")
        collection.create_index("embedding", SEED_INDEX)
        collection.load()
        assert collection.num_entities == stored
        query = kb.embedder.embed_query("How do I promote the database replica?").tolist()
        res = collection.search(
            [query],
            "embedding",
            {"metric_type": "L2", "params": {"nprobe": 16}},
            limit=3,
            output_fields=["doc_id"],
        )
        assert res[0][0].entity.get("doc_id") == "runbooks--database-failover.txt"
        # --- and the store still serves the same collection, with cosine scores ---
        hits = kb.search("How do I promote the database replica?", top_k=3)
        assert hits[0].chunk.doc_id == "runbooks--database-failover.txt"
        assert 0.0 < hits[0].score <= 1.0
        assert abs(hits[0].score - (1 - res[0][0].distance / 2)) < 1e-4
    finally:
        kb.close()
