"""A small HTTP client for the gateway: the CLI talks to the knowledge base
through the same API every other client uses."""

from __future__ import annotations

import json
import mimetypes
from pathlib import Path
from typing import Any

import httpx

from services.kb.loaders import CONTENT_TYPES, suffix_of


class GatewayError(RuntimeError):
    """The gateway refused a request or cannot be reached."""


class BatchNotTaken(Exception):
    """The gateway did not take a batch upload: ``status`` 404/405 (it has no batch endpoint)
    or 413 (the batch is over its limits); the files can still go one by one."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class GatewayClient:
    def __init__(self, base_url: str, api_key: str | None, timeout_s: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, url: str, ok: tuple[int, ...] = (200,), **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, url, **kw)
        except httpx.HTTPError as exc:
            raise GatewayError(
                f"gateway at {self.base_url} is unreachable ({exc}); is it running? (dualtrack local status)"
            ) from None
        if r.status_code not in ok:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            if r.status_code == 401:
                detail = f"{detail} (set DUALTRACK_API_KEY or --api-key)"
            raise GatewayError(f"HTTP {r.status_code}: {_detail(detail)}")
        return r

    def upload(
        self,
        path: Path,
        source: str,
        *,
        classification: str | None = None,
        doc_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        title: str | None = None,
        groups: list[str] | None = None,
        users: list[str] | None = None,
    ) -> dict[str, Any]:
        """Upload one file; returns the ingest result (rejections and refusals included)."""
        data: dict[str, str | list[str]] = {"source": source}
        if groups:
            data["groups"] = groups
        if users:
            data["users"] = users
        if classification:
            data["classification"] = classification
        if doc_id:
            data["doc_id"] = doc_id
        if title:
            data["title"] = title
        if metadata:
            data["metadata"] = json.dumps(metadata)
        with path.open("rb") as fh:
            r = self._request(
                "POST",
                "/v1/documents",
                ok=(200, 201, 403, 413, 415, 422),
                files={"file": (path.name, fh, _content_type(path))},
                data=data,
            )
        body = r.json()
        if "status" not in body:
            return {"name": source, "status": "rejected", "reason": _detail(body.get("detail")), "chunks": 0}
        return body

    def upload_batch(self, files: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Upload several files in one request (``POST /v1/documents/batch``); each entry is a
        path and its options (source, classification, doc_id, metadata, title, groups, users).
        Returns one result per file, in order. Raises ``BatchNotTaken`` when this gateway
        takes no batch (no batch endpoint: 404/405) or not this one (over its limits: 413)."""
        items = [{k: v for k, v in opts.items() if v} for _, opts in files]
        parts = [("files", (path.name, path.read_bytes(), _content_type(path))) for path, _ in files]
        r = self._request(
            "POST",
            "/v1/documents/batch",
            ok=(200, 404, 405, 413),
            files=parts,
            data={"items": json.dumps(items)},
        )
        if r.status_code != 200:
            raise BatchNotTaken(r.status_code)
        return r.json()["results"]

    def search(self, query: str, **kw: Any) -> dict[str, Any]:
        return self._request("POST", "/v1/search", json={"query": query, **_clean(kw)}).json()

    def ask(self, question: str, **kw: Any) -> dict[str, Any]:
        return self._request("POST", "/v1/ask", json={"question": question, **_clean(kw)}).json()

    def delete(self, doc_id: str) -> None:
        self._request("DELETE", f"/v1/documents/{doc_id}", ok=(204,))

    def set_access(self, doc_id: str, **change: Any) -> dict[str, Any]:
        return self._request("PUT", f"/v1/documents/{doc_id}/access", json=_clean(change)).json()

    def documents(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/documents").json()["documents"]


def _clean(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def _detail(detail: Any) -> str:
    if isinstance(detail, list):  # FastAPI validation errors
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
    return str(detail)


def _content_type(path: Path) -> str:
    suffix = suffix_of(path.name)
    return CONTENT_TYPES.get(suffix, (mimetypes.guess_type(path.name)[0] or "application/octet-stream",))[0]
