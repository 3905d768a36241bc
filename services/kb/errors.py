"""Errors the knowledge base raises on purpose. Each message is for the user."""

from __future__ import annotations


class KBError(Exception):
    """Base class: anything here is an expected, explainable failure."""


class DocumentRejected(KBError):
    """A document cannot be ingested; nothing stored was touched."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class StoreUnavailable(KBError):
    """Milvus cannot be reached or answered with an error."""


class StoreTimeout(StoreUnavailable):
    """Milvus did not answer within its deadline (``milvus.timeout_s`` for a read,
    ``milvus.write_timeout_s`` for a write). Unlike a refusal, the call may still complete on
    the server: a writer sends the same writes again (upserts of deterministic ids, deletes of
    what the new version replaces) rather than taking them apart."""


class LookupUnsupported(KBError):
    """This Milvus cannot answer the verbatim text lookup (infix LIKE needs Milvus 2.4 or later)."""


class SchemaMismatch(KBError):
    """The existing collection does not fit the configured model or index."""


class EngineUnsupported(KBError):
    """This Milvus lacks a capability the configuration asks for (BM25 full-text search); the
    message names the engine, its version and the setting that serves without it."""
