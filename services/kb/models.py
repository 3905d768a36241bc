"""Plain data passed between the knowledge-base stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.kb.access import Acl
from services.kb.classification import Classification


@dataclass(frozen=True, slots=True)
class Block:
    """A run of cleaned text from one place in a document (a page, a section)."""

    text: str
    page: int | None = None
    section: str | None = None


@dataclass(slots=True)
class LoadedDocument:
    """A parsed document before chunking. ``declared`` holds labels the file
    itself states (front-matter), ``declared_acl`` who it says may read it; the ingest step
    adds sidecars and rules."""

    name: str
    blocks: list[Block]
    title: str | None = None
    declared: Classification | None = None
    declared_acl: Acl | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n\n".join(b.text for b in self.blocks)


@dataclass(frozen=True, slots=True)
class ChunkDraft:
    """A chunk's text and where it came from, before ids and vectors exist."""

    text: str
    page: int | None
    section: str | None
    page_end: int | None = None
    sections: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Chunk:
    """A stored unit of retrieval; field names match the collection schema."""

    id: str
    doc_id: str
    version: str
    chunk_no: int
    text: str
    classification: Classification
    source: str
    page: int
    metadata: dict[str, Any]
    acl: Acl
    """Who may read it: the document's access list, stored on every chunk."""

    @property
    def sections(self) -> str | None:
        """The headings this chunk spans, for citations (``Remote Work / Vacation``)."""
        names = self.metadata.get("sections") or []
        return " / ".join(names) if names else self.metadata.get("section")


@dataclass(frozen=True, slots=True)
class Hit:
    """A chunk returned by search. ``score`` is its cosine similarity to the query (higher is
    closer) whichever search found it; ``fused`` is the hybrid search's fused score, which is what
    the hits are ordered by there (None for a dense-only search)."""

    chunk: Chunk
    score: float
    fused: float | None = None


@dataclass(frozen=True, slots=True)
class Citation:
    """Where a passage of an answer comes from."""

    n: int
    doc_id: str
    source: str
    page: int | None
    section: str | None
    chunk_id: str
    score: float
    classification: Classification
    title: str | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer with the citations that support it and how it was produced."""

    text: str
    citations: list[Citation]
    route: str
