"""Request and response bodies of the gateway API (they make the OpenAPI spec)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.kb.classification import Classification
from services.kb.filters import SearchFilter


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchRequest(_Body):
    query: str = Field(min_length=1, max_length=4000)
    top_k: int | None = Field(None, ge=1, le=100)
    score_threshold: float | None = Field(None, ge=-1.0, le=1.0)
    filter: SearchFilter | None = None


class AskRequest(_Body):
    question: str = Field(min_length=1, max_length=4000)
    top_k: int | None = Field(None, ge=1, le=100)
    score_threshold: float | None = Field(None, ge=-1.0, le=1.0)
    filter: SearchFilter | None = None


class SearchHit(BaseModel):
    doc_id: str
    chunk_id: str
    chunk_no: int
    score: float
    text: str
    source: str
    title: str | None
    page: int | None
    section: str | None
    classification: Classification
    url: str


class SearchResponse(BaseModel):
    hits: list[SearchHit]


class CitationOut(BaseModel):
    n: int
    doc_id: str
    title: str | None
    source: str
    page: int | None
    section: str | None
    chunk_id: str
    score: float
    classification: Classification
    url: str


class AskResponse(BaseModel):
    answer: str
    citations: list[CitationOut]
    route: str


class IngestResponse(BaseModel):
    name: str
    status: Literal["ingested", "skipped", "rejected"]
    doc_id: str | None
    chunks: int
    version: str | None
    classification: Classification | None
    reason: str | None
    timings: dict[str, float]


class ChunkSummary(BaseModel):
    id: str
    chunk_no: int
    page: int | None
    section: str | None
    words: int


class DocumentOut(BaseModel):
    doc_id: str
    title: str
    source: str
    classification: Classification
    version: str
    content_hash: str
    chunks: int
    ingested_at: float
    metadata: dict[str, object]
    url: str


class DocumentDetail(DocumentOut):
    chunk_list: list[ChunkSummary]


class DocumentList(BaseModel):
    documents: list[DocumentOut]


class Ready(BaseModel):
    ready: bool
    model: bool
    milvus: bool
    reasons: list[str]
