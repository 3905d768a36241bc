"""The knowledge-base collection schema: defined here and nowhere else.

Two collections per knowledge base:

``<name>``            one row per chunk (what search reads)
``<name>_documents``  one row per document: the *active* version of each

and, where knowledge sync runs, ``<name>_sync``: the newest change event applied
per document (tombstones included), so replays and stale events are no-ops.

Milvus has no multi-row transactions, so a document's chunks are never edited
in place. A new version's chunks are written next to the old ones, then the
registry row is flipped to the new version, then the old chunks are deleted.
Search drops any hit whose version is not the registry's active one, so a
reader sees either the old document or the new one, never a mix, and a crash at
any point leaves the old version intact (see ``services.kb.store``).

The vector field is called ``embedding`` so the seed's ORM code
(``Collection("knowledge_base").create_index("embedding", ...)``) keeps working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from pymilvus import CollectionSchema, DataType, Function, FunctionType, MilvusClient

if TYPE_CHECKING:  # config imports the access model, which imports this module
    from services.config import IndexSettings, SearchSettings

# chunk collection fields
ID: Final = "id"
DOC_ID: Final = "doc_id"
VERSION: Final = "version"
CHUNK_NO: Final = "chunk_no"
TEXT: Final = "text"
VECTOR: Final = "embedding"
CLASSIFICATION: Final = "classification"
SOURCE: Final = "source"
PAGE: Final = "page"
METADATA: Final = "metadata"
ACL: Final = "acl"  # who may read: an array of access-list entries (services.kb.access)
ACL_KEY: Final = "acl_key"  # the same entries as one canonical string: what search filters on
SPARSE: Final = "text_sparse"  # BM25 term weights of TEXT, computed by Milvus (never written by us)
BM25_FUNCTION: Final = "text_bm25"
STOP_WORDS: Final = (
    *("a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it"),
    *("no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these"),
    *("they", "this", "to", "was", "will", "with"),
)
"""Lucene's English stop set: words too common to say which chunk a question is about."""
ANALYZER: Final = {
    "tokenizer": "standard",
    "filter": ["lowercase", {"type": "stop", "stop_words": list(STOP_WORDS)}],
}
"""How TEXT is split into terms for BM25: Unicode word boundaries, lower case, no stop words.
No stemming: Milvus Lite has no stemmer, and both engines must index alike."""

CHUNK_OUTPUT_FIELDS: Final = (
    ID,
    DOC_ID,
    VERSION,
    CHUNK_NO,
    TEXT,
    CLASSIFICATION,
    SOURCE,
    PAGE,
    METADATA,
    ACL,
)

# document registry fields (DOC_ID, VERSION, CLASSIFICATION, SOURCE, METADATA shared)
CONTENT_HASH: Final = "content_hash"
TITLE: Final = "title"
CHUNKS: Final = "chunks"
INGESTED_AT: Final = "ingested_at"
MARKER: Final = "marker"  # Milvus requires a vector field in every collection
MARKER_DIM: Final = 2

REGISTRY_OUTPUT_FIELDS: Final = (
    DOC_ID,
    VERSION,
    CONTENT_HASH,
    CLASSIFICATION,
    SOURCE,
    TITLE,
    CHUNKS,
    INGESTED_AT,
    METADATA,
    ACL,
)

SYNCED_FROM: Final = "synced_from"
"""Registry metadata key naming the origin of a document a sync consumer applied: such documents
are the origin's (to publish, and to change), never re-published from here."""

# sync ledger fields (DOC_ID, VERSION, MARKER shared): the newest change applied per document
REVISION: Final = "revision"
ORIGIN: Final = "origin"
DELETED: Final = "deleted"
WRITING: Final = "writing"  # a version whose chunks are being written (crash recovery)
WRITING_CHUNKS: Final = "writing_chunks"

LEDGER_OUTPUT_FIELDS: Final = (DOC_ID, REVISION, ORIGIN, VERSION, DELETED, WRITING, WRITING_CHUNKS)

MAX_TEXT_BYTES: Final = 65535
MAX_DOC_ID: Final = 256
MAX_SOURCE: Final = 1024
ACL_CAPACITY: Final = 64
ACL_ENTRY_BYTES: Final = 256


def registry_name(collection: str) -> str:
    return f"{collection}_documents"


def ledger_name(collection: str) -> str:
    return f"{collection}_sync"


def generation_name(collection: str, n: int) -> str:
    """The ``n``-th physical chunk collection behind the alias ``collection`` (``dualtrack kb
    migrate``); 0 is a collection that served under the name itself before its first rebuild."""
    return f"{collection}__g{n}"


def chunk_schema(dim: int, full_text: bool = True) -> CollectionSchema:
    """The chunk collection; with ``full_text`` TEXT is analyzed and Milvus' BM25 function keeps
    its sparse term vector (``SPARSE``) for keyword search (Milvus 2.5 or later, Milvus Lite)."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(ID, DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field(DOC_ID, DataType.VARCHAR, max_length=MAX_DOC_ID)
    schema.add_field(VERSION, DataType.VARCHAR, max_length=64)
    schema.add_field(CHUNK_NO, DataType.INT64)
    if full_text:
        schema.add_field(
            TEXT, DataType.VARCHAR, max_length=MAX_TEXT_BYTES, enable_analyzer=True, analyzer_params=ANALYZER
        )
    else:
        schema.add_field(TEXT, DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
    schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field(CLASSIFICATION, DataType.VARCHAR, max_length=16)
    schema.add_field(SOURCE, DataType.VARCHAR, max_length=MAX_SOURCE)
    schema.add_field(PAGE, DataType.INT64)
    schema.add_field(METADATA, DataType.JSON)
    _add_acl(schema)
    if full_text:
        schema.add_field(SPARSE, DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(
            Function(
                name=BM25_FUNCTION,
                function_type=FunctionType.BM25,
                input_field_names=[TEXT],
                output_field_names=[SPARSE],
            )
        )
    return schema


def registry_schema() -> CollectionSchema:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(DOC_ID, DataType.VARCHAR, is_primary=True, max_length=MAX_DOC_ID)
    schema.add_field(VERSION, DataType.VARCHAR, max_length=64)
    schema.add_field(CONTENT_HASH, DataType.VARCHAR, max_length=64)
    schema.add_field(CLASSIFICATION, DataType.VARCHAR, max_length=16)
    schema.add_field(SOURCE, DataType.VARCHAR, max_length=MAX_SOURCE)
    schema.add_field(TITLE, DataType.VARCHAR, max_length=1024)
    schema.add_field(CHUNKS, DataType.INT64)
    schema.add_field(INGESTED_AT, DataType.INT64)
    schema.add_field(METADATA, DataType.JSON)
    _add_acl(schema)
    schema.add_field(MARKER, DataType.FLOAT_VECTOR, dim=MARKER_DIM)
    return schema


def _add_acl(schema: CollectionSchema) -> None:
    schema.add_field(
        ACL,
        DataType.ARRAY,
        element_type=DataType.VARCHAR,
        max_capacity=ACL_CAPACITY,
        max_length=ACL_ENTRY_BYTES,
    )
    schema.add_field(ACL_KEY, DataType.VARCHAR, max_length=ACL_CAPACITY * (ACL_ENTRY_BYTES + 1))


ACCESS_FIELDS: Final = (ACL, ACL_KEY)
"""What a collection created before access lists (or before their key) lacks: ``dualtrack kb
migrate`` adds them."""


def ledger_schema() -> CollectionSchema:
    """One row per document a sync consumer or publisher has touched, deletes included
    (a tombstone): what makes an older or repeated change event a no-op."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(DOC_ID, DataType.VARCHAR, is_primary=True, max_length=MAX_DOC_ID)
    schema.add_field(REVISION, DataType.INT64)
    schema.add_field(ORIGIN, DataType.VARCHAR, max_length=128)
    schema.add_field(VERSION, DataType.VARCHAR, max_length=64)
    schema.add_field(DELETED, DataType.BOOL)
    schema.add_field(WRITING, DataType.VARCHAR, max_length=64)
    schema.add_field(WRITING_CHUNKS, DataType.INT64)
    schema.add_field(MARKER, DataType.FLOAT_VECTOR, dim=MARKER_DIM)
    return schema


FIELD_TYPES: Final[dict[str, DataType]] = {
    f.name: f.dtype for fields in (chunk_schema(2), registry_schema(), ledger_schema()) for f in fields.fields
}
"""Every field's Milvus type, by name (a name shared by collections has one type): what a
column-wise upsert declares."""


def index_build_params(index: IndexSettings) -> dict[str, int]:
    """Build parameters for the configured index type (already validated)."""
    if index.type == "HNSW":
        return {"M": index.hnsw_m, "efConstruction": index.hnsw_ef_construction}
    if index.type == "IVF_FLAT":
        return {"nlist": index.ivf_nlist}
    return {}


def search_params(index: IndexSettings, search: SearchSettings, limit: int) -> dict[str, object]:
    """Query-time parameters; HNSW needs ``ef >= limit`` so it is raised if lower."""
    params: dict[str, int] = {}
    if index.type == "HNSW":
        params = {"ef": max(search.hnsw_ef, limit)}
    elif index.type == "IVF_FLAT":
        params = {"nprobe": min(search.ivf_nprobe, index.ivf_nlist)}
    return {"metric_type": index.metric, "params": params}
