"""The knowledge-update event schema: defined here and nowhere else.

Every message on the ``knowledge_updates`` topic is one UTF-8 JSON object, keyed
by ``doc_id`` so all changes to a document land on one partition, in order.

``document.upsert``  a document's complete new state: registry fields plus every
                     chunk (text, chunk_no, page, metadata) and, optionally, the
                     chunk vectors with the embedding model that made them
``document.delete``  the document is gone

Ordering across sites is by ``(revision, origin)``: ``revision`` is the origin's
microsecond clock at the change, bumped past the last revision it knew for the
document, so a receiver can tell an old change from a new one whatever order
the events arrive in. ``version`` identifies the content (the chunk ids are
derived from it), so the same ``doc_id`` + ``version`` applied twice is one state.

Vectors travel as base64 of little-endian float32, exact and a third the size
of a JSON float list. ``schema_version`` changes only with an incompatible
layout; a consumer refuses versions it does not know (dead-letter) rather than
guess. The JSON Schema is published at ``docs/sync-event.schema.json``
(``dualtrack sync schema``).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Annotated, Any, Final, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from services.kb import schema
from services.kb.access import Acl, AclError
from services.kb.classification import Classification
from services.kb.ingest import validate_doc_id
from services.kb.schema import MAX_SOURCE, MAX_TEXT_BYTES

SCHEMA_VERSION: Final = 1
UPSERT: Final = "document.upsert"
DELETE: Final = "document.delete"
MAX_CHUNKS: Final = 100_000
NORM_TOLERANCE: Final = 1e-3
"""How far a shipped vector's length may be from 1: embeddings are stored L2-normalised, and a
vector that is not (zero, NaN, scaled) would rank wrongly here without anyone noticing."""
SYNCED_FROM: Final = schema.SYNCED_FROM


class InvalidEvent(ValueError):
    """A message that is not a valid event; the message is the dead-letter reason."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventChunk(_Model):
    """One chunk of the document's new version."""

    chunk_no: int = Field(ge=0)
    text: str = Field(min_length=1)
    page: int = Field(0, ge=0)
    metadata: dict[str, Any] = {}
    vector: str | None = Field(None, description="base64 of little-endian float32, embedding.dimension long")

    @field_validator("text")
    @classmethod
    def _fits(cls, v: str) -> str:
        if len(v.encode()) > MAX_TEXT_BYTES:
            raise ValueError(f"is over {MAX_TEXT_BYTES} bytes (UTF-8)")
        return v


class Embedding(_Model):
    """The model the shipped vectors come from; a receiver uses them only if its own
    model id and dimension are the same, and re-embeds the text otherwise."""

    model: str = Field(min_length=1, max_length=512)
    dimension: int = Field(ge=1, le=65536)


class _Event(_Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=64)
    origin: str = Field(min_length=1, max_length=128, description="The publishing site (or cdc:<table>).")
    doc_id: str
    revision: int = Field(ge=0, lt=2**63, description="Origin clock in microseconds; higher wins.")
    occurred_at: float = Field(default_factory=time.time)

    @field_validator("doc_id")
    @classmethod
    def _doc_id(cls, v: str) -> str:
        return validate_doc_id(v)

    @property
    def order(self) -> tuple[int, str]:
        """Total order of changes to one document: later revision wins, origin breaks ties."""
        return (self.revision, self.origin)


class DocumentUpsert(_Event):
    type: Literal["document.upsert"] = UPSERT
    version: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    content_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    classification: Classification
    source: str = Field(min_length=1)
    title: str = Field(max_length=1000)
    metadata: dict[str, Any] = {}
    acl: list[str] | None = Field(
        None,
        max_length=schema.ACL_CAPACITY,
        description="Who may read it (access-list entries: *, group:<name>, user:<subject>); "
        "absent: the receiver's access.default_groups.",
    )
    chunks: list[EventChunk] = Field(min_length=1, max_length=MAX_CHUNKS)
    embedding: Embedding | None = None

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if len(v.encode()) > MAX_SOURCE:
            raise ValueError(f"is over {MAX_SOURCE} bytes (UTF-8)")
        return v

    @field_validator("acl")
    @classmethod
    def _acl(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        try:
            Acl.parse_stored(v)
        except AclError as exc:
            raise ValueError(str(exc)) from None
        return sorted(set(v))

    def access(self, default: Acl) -> Acl:
        """The document's access list, or ``default`` when the origin stated none."""
        return Acl.parse_stored(self.acl) if self.acl is not None else default

    @model_validator(mode="after")
    def _consistent(self) -> DocumentUpsert:
        numbers = [c.chunk_no for c in self.chunks]
        if numbers != list(range(len(numbers))):
            raise ValueError("chunks must be numbered 0..n-1 in order, each once")
        with_vectors = sum(c.vector is not None for c in self.chunks)
        if with_vectors and with_vectors != len(self.chunks):
            raise ValueError("either every chunk carries a vector or none does")
        if with_vectors and self.embedding is None:
            raise ValueError("chunks carry vectors but embedding (model, dimension) is missing")
        if with_vectors and self.embedding is not None:
            for c in self.chunks:
                got = _decoded_length(c.vector or "")
                if got != self.embedding.dimension:
                    raise ValueError(
                        f"chunk {c.chunk_no} has a {got}-d vector but embedding.dimension "
                        f"is {self.embedding.dimension}"
                    )
            vectors = self.vectors()
            assert vectors is not None
            with np.errstate(all="ignore"):
                norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
            bad = np.flatnonzero(~(np.abs(norms - 1.0) <= NORM_TOLERANCE))  # NaN fails too
            if bad.size:
                raise ValueError(
                    f"chunk {int(bad[0])} has a vector of norm {norms[bad[0]]:.4g}: shipped vectors are "
                    f"L2-normalised (finite, norm 1 ± {NORM_TOLERANCE})"
                )
        return self

    def vectors(self) -> np.ndarray | None:
        """The shipped vectors as an (n, dim) float32 array, or None."""
        if self.embedding is None or self.chunks[0].vector is None:
            return None
        raw = b"".join(base64.b64decode(c.vector or "") for c in self.chunks)
        return np.frombuffer(raw, dtype="<f4").reshape(len(self.chunks), self.embedding.dimension)


class DocumentDelete(_Event):
    type: Literal["document.delete"] = DELETE


Event = Annotated[DocumentUpsert | DocumentDelete, Field(discriminator="type")]
_ADAPTER: TypeAdapter[DocumentUpsert | DocumentDelete] = TypeAdapter(Event)


def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _decoded_length(text: str) -> int:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("a chunk vector is not valid base64") from None
    if len(raw) % 4:
        raise ValueError("a chunk vector is not a whole number of float32 values")
    return len(raw) // 4


def encode(event: DocumentUpsert | DocumentDelete) -> bytes:
    return event.model_dump_json(exclude_none=True).encode()


def key(event: DocumentUpsert | DocumentDelete) -> bytes:
    """The message key: one document's events share a partition, so they stay ordered."""
    return event.doc_id.encode()


def decode(raw: bytes | None) -> DocumentUpsert | DocumentDelete:
    """Parse one message value; :class:`InvalidEvent` says why it is not an event."""
    if raw is None:
        raise InvalidEvent("empty message (no value)")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"not a JSON object but {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InvalidEvent(
            f"schema_version {version!r} is not supported (this consumer reads {SCHEMA_VERSION}); "
            "upgrade the consumer before the publishers"
        )
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'event'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise InvalidEvent(f"invalid event: {problems}") from None


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of a message value."""
    schema = _ADAPTER.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"dualtrack knowledge-update event, schema_version {SCHEMA_VERSION}"
    return schema
