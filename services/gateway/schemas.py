"""Request and response bodies of the gateway API (they make the OpenAPI spec)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.kb.access import Acl
from services.kb.classification import Classification
from services.kb.filters import SearchFilter
from services.kb.schema import MAX_DOC_ID, MAX_SOURCE


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
    include_reasoning: bool = Field(False, description="Return a reasoning model's thinking too.")


class SearchHit(BaseModel):
    doc_id: str
    chunk_id: str
    chunk_no: int
    score: float = Field(description="Cosine similarity of the chunk to the query.")
    fused_score: float | None = Field(
        None,
        description="Hybrid search: the fused dense + BM25 score the hits are ordered by "
        "(absent for a dense-only search).",
    )
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
    url: str = Field(description="The cited chunk: its text and where it comes from.")
    quote: str | None = Field(None, description="The span of this passage the answer quotes.")


class AskResponse(BaseModel):
    answer: str
    reasoning: str | None = Field(None, description="A reasoning model's thinking (include_reasoning).")
    citations: list[CitationOut] = Field(description="The passages the answer cites, as it numbers them.")
    unresolved_citations: list[int] = Field(
        default_factory=list, description="Markers in the answer that point to no passage."
    )
    route: str = Field(
        description="cloud, local, extractive, or cloud+local / cloud+extractive (the cloud stopped midway)"
    )
    route_reason: str = Field(
        "", description="Why: no-sensitive-content, confidential-context, personal-data:<detector>, ..."
    )
    failover: str | None = Field(None, description="Why the cloud was not used although allowed")


class Access(BaseModel):
    """Who may read a document: groups (``*`` is every signed-in principal) and users."""

    groups: list[str]
    users: list[str]

    @classmethod
    def of(cls, acl: Acl) -> Access:
        return cls(groups=acl.groups, users=acl.users)


class IngestResponse(BaseModel):
    name: str
    status: Literal["ingested", "skipped", "rejected", "refused"]
    doc_id: str | None
    chunks: int
    version: str | None
    classification: Classification | None
    access: Access | None
    reason: str | None
    timings: dict[str, float]


class BatchItem(BaseModel):
    """The options of one file in a batch upload: what the single upload takes as form fields."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, max_length=MAX_SOURCE, description="path used for rules and citations")
    doc_id: str | None = Field(None, max_length=MAX_DOC_ID)
    classification: str | None = Field(None, max_length=32, description="public | internal | confidential")
    title: str | None = Field(None, max_length=200)
    metadata: dict[str, str | int | float | bool] | None = None
    groups: list[str] | None = Field(None, description='who may read it; "*" is everyone')
    users: list[str] | None = None


class BatchIngestResponse(BaseModel):
    """One result per file, in the order sent: each file is ingested, skipped, rejected or
    refused on its own (a rejected file does not stop the others)."""

    results: list[IngestResponse]


class ChunkOut(BaseModel):
    """One stored chunk: what a citation points to."""

    id: str
    doc_id: str
    chunk_no: int
    title: str | None
    source: str
    page: int | None
    section: str | None
    classification: Classification
    text: str
    document_url: str


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
    access: Access
    url: str


class AccessChange(_Body):
    """An admin's change to a document's label or access list; what is left out stays as it is.
    Unlike a re-ingest, this may lower a label or widen the list, and the audit log records it."""

    classification: Classification | None = None
    groups: list[str] | None = Field(None, max_length=64)
    users: list[str] | None = Field(None, max_length=64)
    reason: str = Field(min_length=1, max_length=500, description="Why: kept in the audit log.")


class AccessChanged(BaseModel):
    doc_id: str
    before: DocumentOut
    after: DocumentOut


class DocumentDetail(DocumentOut):
    chunk_list: list[ChunkSummary]


class DocumentList(BaseModel):
    documents: list[DocumentOut]


class Ready(BaseModel):
    """Whether the gateway can serve. The details (which part is not ready, and why) name
    hosts and settings: they are shown only to a principal with the monitor role (or more)."""

    ready: bool
    model: bool | None = None
    milvus: bool | None = None
    reasons: list[str] | None = None
    notes: list[str] | None = Field(None, description="Served, but less well than configured, and why.")


# -- OpenAI-compatible chat completions -----------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The text of the message; content given as parts keeps its text parts."""
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content if p.type == "text" and p.text)
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    """The OpenAI request shape; fields this gateway does not use are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=100)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=100_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=100_000)
    temperature: float | None = Field(None, ge=0, le=2)
    # dualtrack extensions (ignored by OpenAI clients that do not send them)
    top_k: int | None = Field(None, ge=1, le=100)
    filter: SearchFilter | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = Field(None, description="A reasoning model's thinking (DeepSeek's API).")


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str = "stop"


class CompletionDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="Answer and reasoning tokens.")
    total_tokens: int
    completion_tokens_details: CompletionDetails = CompletionDetails()
    prompt_tokens_exact: bool = Field(
        False, description="Counted by the model's tokenizer (false: approximated, no tokenizer configured)."
    )


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    citations: list[CitationOut]
    unresolved_citations: list[int] = []
    route: str
    route_reason: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "dualtrack"
    description: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
