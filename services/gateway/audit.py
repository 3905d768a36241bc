"""The gateway's audit records: one per request, filled in by the endpoints as they work and
written when the response is complete (a streamed answer: when its stream ends).

What a record holds: time, request id, principal, action and its target, status, the question
(its hash by default), the chunks returned with their labels, the passages put in a model's
prompt, the route and why, and every model call with the bytes and tokens sent (never the text).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request

from services.audit.chain import AuditError
from services.audit.log import AuditLog, utc_now
from services.auth.principal import Principal
from services.kb.models import Hit

log = logging.getLogger(__name__)

ACTIONS = {
    ("POST", "/v1/search"): "search",
    ("POST", "/v1/ask"): "ask",
    ("POST", "/v1/chat/completions"): "chat",
    ("GET", "/v1/models"): "models",
    ("GET", "/v1/documents"): "list",
    ("POST", "/v1/documents"): "upload",
    ("POST", "/v1/documents/batch"): "upload_batch",
    ("GET", "/v1/documents/{doc_id}"): "get",
    ("DELETE", "/v1/documents/{doc_id}"): "delete",
    ("GET", "/v1/documents/{doc_id}/chunks/{chunk_id}"): "get_chunk",
    ("PUT", "/v1/documents/{doc_id}/access"): "set_access",
}


def passages(hits: Sequence[Hit]) -> list[dict[str, str]]:
    """Chunk ids with their documents and labels: what a record says about passages."""
    return [
        {"chunk_id": h.chunk.id, "doc_id": h.chunk.doc_id, "classification": h.chunk.classification.value}
        for h in hits
    ]


@dataclass
class AuditEntry:
    """One request's record while it is being answered."""

    request_id: str
    method: str
    path: str
    started: str
    principal: Principal | None = None
    question: str | None = None
    results: list[dict[str, str]] = field(default_factory=list)
    prompt: list[dict[str, str]] = field(default_factory=list)
    route: str | None = None
    route_reason: str | None = None
    egress: list[dict[str, Any]] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    route_path: str | None = None
    """The matched route's template (``/v1/documents/{doc_id}``), once routed."""
    target: dict[str, str] = field(default_factory=dict)
    """The route's path parameters: the document or chunk acted on."""
    deferred: bool = False
    """Set by a streaming endpoint: it finishes the entry when its stream ends."""
    _sink: Any = None
    _done: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def action(self) -> str:
        return ACTIONS.get((self.method, self.route_path or ""), "other")

    def record(self, status: int | None, questions: str) -> dict[str, Any]:
        """The record; ``status`` None for the one written as a write or stream begins."""
        p = self.principal
        action = "signin" if status == 401 else self.action
        if status is None:
            return {
                "ts": self.started,
                "request_id": self.request_id,
                "phase": "begin",
                "principal": {"subject": p.subject, "kind": p.kind, "issuer": p.issuer} if p else None,
                "method": self.method,
                "path": self.path,
            }
        target = self.target if action != "other" else {"path": self.path, **self.target}
        rec: dict[str, Any] = {
            "ts": self.started,
            "request_id": self.request_id,
            "principal": {"subject": p.subject, "kind": p.kind, "issuer": p.issuer} if p else None,
            "action": action,
            "status": status,
        }
        if target:
            rec["target"] = target
        if self.question is not None and questions != "none":
            rec["question"] = (
                {"text": self.question}
                if questions == "text"
                else {"sha256": hashlib.sha256(self.question.encode()).hexdigest()}
            )
        for key, value in (
            ("results", self.results),
            ("prompt", self.prompt),
            ("route", self.route),
            ("route_reason", self.route_reason),
            ("egress", self.egress),
            ("detail", self.detail),
        ):
            if value:
                rec[key] = value
        return rec

    def begin(self) -> bool:
        """Record that a write (or a streamed answer) starts, before it acts: if even that
        cannot be recorded, it must not happen. False when the log could not take it."""
        if self._sink is None:
            return True
        return self._sink(self, None)

    def finish(self, status: int) -> bool:
        """Write the record once; False when the audit log could not take it."""
        with self._lock:
            if self._done or self._sink is None:
                return True
            self._done = True
        return self._sink(self, status)


class Auditor:
    """Creates each request's entry and writes it to the log (or nowhere, when audit is off)."""

    def __init__(self, log_: AuditLog | None, questions: Literal["hash", "text", "none"]) -> None:
        self.log = log_
        self.questions = questions

    def begin(self, request: Request) -> AuditEntry:
        entry = AuditEntry(uuid.uuid4().hex, request.method, request.url.path, utc_now())
        entry._sink = self._write if self.log is not None else None
        return entry

    def _write(self, entry: AuditEntry, status: int | None) -> bool:
        try:
            assert self.log is not None
            self.log.write(entry.record(status, self.questions))
        except AuditError as exc:
            log.error("audit record of request %s not written: %s", entry.request_id, exc)
            return False
        return True

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def audit_of(request: Request) -> AuditEntry:
    return request.state.audit
