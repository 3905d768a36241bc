"""The gateway over real HTTP (uvicorn on a free loopback port), backed by real
Milvus Lite and the real offline embedding model."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.config import ConfigError
from services.gateway.app import create_app
from services.kb.service import KnowledgeBase
from tests.support import SAMPLES, MilvusServer, free_port, serve, wait_ready

KEY = "test-key-0123456789"
QUERY = "How many vacation days do full-time employees get?"


@pytest.fixture
def gateway(make_settings, embedder) -> Iterator[httpx.Client]:
    settings = make_settings(gateway={"api_key": KEY}, ingest={"max_file_bytes": 12 * 1024 * 1024})
    app = create_app(settings, KnowledgeBase(settings, embedder=embedder))
    with serve(app) as url:
        wait_ready(url)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            yield c


def upload(client: httpx.Client, rel: str, data: bytes | None = None, **form: str) -> httpx.Response:
    content = data if data is not None else (SAMPLES / rel).read_bytes()
    return client.post(
        "/v1/documents", files={"file": (Path(rel).name, content)}, data={"source": rel, **form}
    )


def load_samples(client: httpx.Client) -> None:
    for rel in (
        "handbook/employee-handbook.md",
        "policies/travel-and-expense-policy.pdf",
        "runbooks/database-failover.txt",
    ):
        assert upload(client, rel).status_code == 201


def snapshot(client: httpx.Client) -> tuple[Any, Any]:
    docs = sorted(
        (d["doc_id"], d["version"], d["chunks"]) for d in client.get("/v1/documents").json()["documents"]
    )
    hits = [
        (h["chunk_id"], h["score"]) for h in client.post("/v1/search", json={"query": QUERY}).json()["hits"]
    ]
    return docs, hits


def test_auth_is_required_except_for_probes(gateway: httpx.Client) -> None:
    base = str(gateway.base_url)
    assert httpx.post(base + "/v1/search", json={"query": "x"}).status_code == 401
    wrong = httpx.post(base + "/v1/search", json={"query": "x"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert httpx.get(base + path).status_code == 200, path
    assert httpx.get(base + "/readyz").json() == {"ready": True}  # no hosts, no reasons
    assert httpx.get(base + "/metrics").status_code == 401


def test_metrics_and_readiness_details_need_the_monitor_role(make_settings, embedder, tmp_path: Path) -> None:
    from services.auth.keys import KeyStore
    from services.auth.principal import Role
    from services.kb.classification import Classification

    store = KeyStore(tmp_path / "keys.db")
    monitor, _ = store.create("prometheus", [Role.MONITOR], [], Classification.PUBLIC, None)
    settings = make_settings(gateway={"api_key": KEY, "keys_file": str(tmp_path / "keys.db")})
    with serve(create_app(settings, KnowledgeBase(settings, embedder=embedder))) as url:
        wait_ready(url)
        scrape = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {monitor}"})
        assert scrape.status_code == 200 and "dualtrack_" in scrape.text
        ready = httpx.get(url + "/readyz", headers={"Authorization": f"Bearer {monitor}"}).json()
        assert ready["ready"] is True and ready["milvus"] is True and "reasons" in ready
        # the monitor role reads no content
        search = httpx.post(
            url + "/v1/search", json={"query": "x"}, headers={"Authorization": f"Bearer {monitor}"}
        )
        assert search.status_code == 403
        wrong = httpx.get(url + "/readyz", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 200 and wrong.json() == {"ready": True}


def test_api_pages_load_nothing_from_outside(gateway: httpx.Client) -> None:
    """/docs and /redoc work on a host without internet: every script, style and icon they
    name is served here, without sign-in."""
    import re

    base = str(gateway.base_url)
    for page in ("/docs", "/redoc"):
        html = httpx.get(base + page).text
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
        assets = [u for u in urls if not u.startswith("/openapi.json")]
        assert assets, html
        for url in assets:
            assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url}"
            assert httpx.get(base + url).status_code == 200, url
        assert "cdn." not in html and "fonts.googleapis" not in html


def test_auth_without_a_key_refuses_to_start(make_settings) -> None:
    with pytest.raises(ConfigError, match="gateway.auth_enabled is true but no way to sign in is set"):
        create_app(make_settings())


def test_openapi_lists_the_api(gateway: httpx.Client) -> None:
    paths = gateway.get("/openapi.json").json()["paths"]
    for p in ("/v1/documents", "/v1/documents/{doc_id}", "/v1/search", "/v1/ask", "/healthz", "/readyz"):
        assert p in paths


def test_document_lifecycle_search_and_ask(gateway: httpx.Client) -> None:
    r = upload(gateway, "confidential/project-falcon-acquisition.md", classification="confidential")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["classification"] == "confidential" and body["chunks"] >= 1
    assert (
        upload(gateway, "confidential/project-falcon-acquisition.md", classification="confidential").json()[
            "status"
        ]
        == "skipped"
    )
    load_samples(gateway)

    doc = gateway.get(f"/v1/documents/{body['doc_id']}").json()
    assert doc["chunks"] == len(doc["chunk_list"]) == body["chunks"]
    assert doc["url"].endswith(f"/v1/documents/{body['doc_id']}")

    hits = gateway.post("/v1/search", json={"query": "per-diem rates for meals", "top_k": 3}).json()["hits"]
    assert hits[0]["doc_id"] == "policies--travel-and-expense-policy.pdf" and hits[0]["page"]
    assert hits[0]["url"].endswith(f"#page={hits[0]['page']}")

    public_only = gateway.post(
        "/v1/search", json={"query": "acquisition", "filter": {"classifications": ["internal", "public"]}}
    ).json()["hits"]
    assert all(h["classification"] != "confidential" for h in public_only)

    ans = gateway.post("/v1/ask", json={"question": QUERY}).json()
    assert ans["route"] == "extractive"
    assert "[1]" in ans["answer"] and "30" in ans["answer"]
    assert ans["citations"][0]["doc_id"] == "handbook--employee-handbook.md"
    assert ans["citations"][0]["url"].startswith("http://127.0.0.1:")

    assert gateway.delete(f"/v1/documents/{body['doc_id']}").status_code == 204
    assert gateway.get(f"/v1/documents/{body['doc_id']}").status_code == 404
    assert gateway.delete(f"/v1/documents/{body['doc_id']}").status_code == 404
    assert all(
        h["doc_id"] != body["doc_id"]
        for h in gateway.post("/v1/search", json={"query": "Falcon"}).json()["hits"]
    )


def _pdf_corrupt() -> bytes:
    data = (SAMPLES / "policies/travel-and-expense-policy.pdf").read_bytes()
    return data[:200] + b"\x00garbage" * 50


BAD_UPLOADS = [
    ("corrupt.pdf", _pdf_corrupt(), 422, "corrupt or unreadable PDF"),
    ("empty.txt", b"", 422, "file is empty"),
    ("binary.txt", bytes(range(256)) * 40, 422, "binary file"),
    ("sheet.xlsx", b"PK\x03\x04", 415, "unsupported file type '.xlsx'"),
    ("latin1.md", "Gr\xfc\xdfe aus K\xf6ln".encode("latin-1"), 422, "not valid UTF-8"),
    ("huge.txt", b"a" * (13 * 1024 * 1024), 413, "ingest.max_file_bytes"),
    (
        "one-line.txt",
        b"lorem ipsum dolor sit amet " * (10 * 1024 * 1024 // 27),
        422,
        "ingest.max_chunks_per_document",
    ),
]


@pytest.mark.parametrize(("name", "data", "code", "needle"), BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_are_rejected_and_nothing_changes(
    gateway: httpx.Client, name: str, data: bytes, code: int, needle: str
) -> None:
    load_samples(gateway)
    before = snapshot(gateway)
    r = upload(gateway, name, data)
    assert r.status_code == code, r.text
    body = r.json()
    message = body.get("reason") or body.get("detail")
    assert needle in message
    if code == 422:
        assert body["name"] == name
    assert snapshot(gateway) == before


def test_bad_replacement_keeps_the_stored_version(gateway: httpx.Client) -> None:
    load_samples(gateway)
    before = snapshot(gateway)
    r = upload(gateway, "policies/travel-and-expense-policy.pdf", b"%PDF-1.4 truncated")
    assert r.status_code == 422 and "travel-and-expense-policy.pdf" in r.json()["name"]
    assert snapshot(gateway) == before


@pytest.mark.parametrize(
    "flt",
    [
        {"sources": ['" or 1==1 or "']},
        {"metadata": {"owner": 'x" or doc_id != "'}},
        {"doc_ids": ['a") or (1==1']},
    ],
)
def test_filter_injection_matches_nothing(gateway: httpx.Client, flt: dict) -> None:
    load_samples(gateway)
    before = snapshot(gateway)
    r = gateway.post("/v1/search", json={"query": QUERY, "filter": flt})
    assert r.status_code == 200 and r.json()["hits"] == []
    assert snapshot(gateway) == before


def test_invalid_filter_key_and_label_are_422(gateway: httpx.Client) -> None:
    r = gateway.post("/v1/search", json={"query": "x", "filter": {"metadata": {"a] or 1==1": "b"}}})
    assert r.status_code == 422 and "must be an identifier" in r.text
    r = upload(gateway, "a.md", b"# hi\n\nhello there", classification="secret")
    assert r.status_code == 422 and "'secret' is not one of: public, internal, confidential" in r.text
    r = upload(gateway, "a.md", b"# hi\n\nhello there", metadata="[1, 2]")
    assert r.status_code == 422 and "metadata must be a JSON object" in r.text
    r = upload(gateway, "a.md", b"# hi\n\nhello there", metadata='{"synced_from": "site-a"}')
    assert r.status_code == 422 and "metadata 'synced_from' is reserved" in r.text


def test_content_type_mismatch_is_415(gateway: httpx.Client) -> None:
    r = gateway.post("/v1/documents", files={"file": ("a.pdf", b"%PDF-1.4", "image/png")})
    assert r.status_code == 415 and "does not match .pdf" in r.json()["detail"]


def test_concurrent_identical_uploads_store_one_copy(gateway: httpx.Client) -> None:
    data = (SAMPLES / "runbooks/database-failover.txt").read_bytes()
    codes: list[int] = []
    barrier = threading.Barrier(3)

    def send() -> None:
        barrier.wait()
        codes.append(upload(gateway, "runbooks/database-failover.txt", data).status_code)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200, 200, 201]
    doc = gateway.get("/v1/documents/runbooks--database-failover.txt").json()
    ids = [c["id"] for c in doc["chunk_list"]]
    assert len(ids) == len(set(ids)) == doc["chunks"]


def test_metrics_record_requests_ingest_and_search(gateway: httpx.Client) -> None:
    load_samples(gateway)
    gateway.post("/v1/search", json={"query": QUERY})
    text = gateway.get("/metrics").text
    assert (
        'dualtrack_http_request_duration_seconds_count{method="POST",route="/v1/search",status="200"} 1.0'
        in text
    )
    assert 'dualtrack_ingest_documents_total{status="ingested"} 3.0' in text
    assert 'dualtrack_ingested_chunks_total{classification="internal"}' in text
    assert "dualtrack_search_duration_seconds_count 1.0" in text


def test_milvus_down_then_up(make_settings, embedder, tmp_path: Path) -> None:
    port = free_port()
    settings = make_settings(
        milvus={"uri": f"http://127.0.0.1:{port}", "timeout_s": 3}, gateway={"api_key": KEY}
    )
    app = create_app(settings, KnowledgeBase(settings, embedder=embedder))
    headers = {"Authorization": f"Bearer {KEY}"}
    with serve(app) as url:
        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.get(url + "/readyz").json() == {"ready": False}  # the details need a monitor
        ready = httpx.get(url + "/readyz", headers=headers)
        assert ready.status_code == 503
        assert ready.json()["model"] is True and ready.json()["milvus"] is False
        assert f"127.0.0.1:{port}" in ready.json()["reasons"][0]
        r = httpx.post(url + "/v1/search", json={"query": "x"}, headers=headers)
        assert r.status_code == 503 and f"127.0.0.1:{port}" in r.json()["detail"]
        r = httpx.post(
            url + "/v1/documents", files={"file": ("a.md", b"# a\n\nhello world")}, headers=headers
        )
        assert r.status_code == 503

        server = MilvusServer(tmp_path / "late", port=port).start()
        try:
            wait_ready(url, timeout=30)
            r = httpx.post(
                url + "/v1/documents", files={"file": ("a.md", b"# a\n\nhello world")}, headers=headers
            )
            assert r.status_code == 201, r.text
        finally:
            server.stop()
        # Milvus dies under a connected gateway: 503 with the reason, no crash ...
        r = httpx.post(url + "/v1/search", json={"query": "hello"}, headers=headers)
        assert r.status_code == 503 and f"127.0.0.1:{port}" in r.json()["detail"]
        assert httpx.get(url + "/readyz").status_code == 503
        assert httpx.get(url + "/healthz").status_code == 200
        # ... and requests recover by themselves (no /readyz poll), data intact
        server = MilvusServer(tmp_path / "late", port=port).start()
        try:
            deadline = time.monotonic() + 30
            while True:
                r = httpx.post(url + "/v1/search", json={"query": "hello"}, headers=headers)
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert r.status_code == 200, r.text
            assert [h["doc_id"] for h in r.json()["hits"]] == ["a.md"]
        finally:
            server.stop()


def test_upload_metadata_is_filterable(gateway: httpx.Client) -> None:
    r = upload(
        gateway,
        "team.md",
        b"# Team\n\nThe platform team owns the Kafka cluster.",
        metadata=json.dumps({"team": "platform"}),
    )
    assert r.status_code == 201
    hits = gateway.post(
        "/v1/search", json={"query": "Kafka", "filter": {"metadata": {"team": "platform"}}}
    ).json()["hits"]
    assert [h["doc_id"] for h in hits] == ["team.md"]
    none = gateway.post(
        "/v1/search", json={"query": "Kafka", "filter": {"metadata": {"team": "sales"}}}
    ).json()["hits"]
    assert none == []


def test_uploads_are_gated_before_the_body_is_read(gateway: httpx.Client) -> None:
    base = str(gateway.base_url)
    anonymous = httpx.post(base + "/v1/documents", files={"file": ("a.md", b"# a\n\nhello")})
    assert anonymous.status_code == 401

    def chunked():
        yield b"--x\r\n"

    no_length = gateway.post(
        "/v1/documents", content=chunked(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert no_length.status_code == 411 and "Content-Length" in no_length.json()["detail"]


def test_every_body_is_capped_before_it_is_read(gateway: httpx.Client) -> None:
    big = json.dumps({"query": "x" * (3 * 1024 * 1024)}).encode()
    for path in ("/v1/search", "/v1/chat/completions", "/v1/ask"):
        r = gateway.post(path, content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413, (path, r.text)
        assert "over the limit of 2097152 (gateway.max_request_bytes)" in r.json()["detail"]

    def chunked():
        yield b'{"query": '
        yield b'"vacation"}'

    r = gateway.post("/v1/search", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 411 and "a request body needs a Content-Length" in r.json()["detail"]
    small = gateway.post("/v1/search", json={"query": "vacation"})
    assert small.status_code == 200, small.text


def test_impossible_doc_ids_are_404(gateway: httpx.Client) -> None:
    for bad in ("a%0Ab", "%22%20or%201%3D%3D1"):
        assert gateway.get(f"/v1/documents/{bad}").status_code == 404
        assert gateway.delete(f"/v1/documents/{bad}").status_code == 404


def test_sidecar_title_reaches_citations(gateway: httpx.Client) -> None:
    r = upload(
        gateway, "notes.md", b"# x\n\nThe lift in hall B is serviced every March.", title="Facilities notes"
    )
    assert r.status_code == 201
    hit = gateway.post("/v1/search", json={"query": "lift service"}).json()["hits"][0]
    assert hit["title"] == "Facilities notes"


def test_a_code_the_store_cannot_look_up_keeps_the_answer_local(make_settings, embedder) -> None:
    """Milvus before 2.4 has no infix LIKE: whether a code in a question is stored under a
    label that may not leave is unknown, so the answer stays on the premises, saying why."""
    settings = make_settings(
        gateway={"api_key": KEY}, llm={"cloud": {"url": "http://127.0.0.1:9", "connect_timeout_s": 0.5}}
    )
    kb = KnowledgeBase(settings, embedder=embedder)
    with serve(create_app(settings, kb)) as url:
        wait_ready(url)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            assert upload(c, "handbook/employee-handbook.md").status_code == 201
            ask = {"question": "What does the code OWL-7781-ZX in the handbook mean?"}
            looked = c.post("/v1/ask", json=ask).json()
            supported = kb.store._infix_like  # False once Milvus refused the pattern
            kb.store._infix_like = False  # as Milvus 2.3 answers the first LIKE "%...%" query
            unlooked = c.post("/v1/ask", json=ask).json()
            plain = c.post("/v1/ask", json={"question": QUERY}).json()
    if not supported:  # Milvus standalone 2.3 (DUALTRACK_TEST_MILVUS_URI): unknown from the start
        assert looked["route_reason"] == "verbatim-lookup-unavailable"
    else:  # the code is stored nowhere: the cloud was allowed (and is down: answered here)
        assert looked["route_reason"] == "no-sensitive-content" and looked["failover"] == "transport"
    assert (unlooked["route"], unlooked["route_reason"]) == ("extractive", "verbatim-lookup-unavailable")
    assert unlooked["failover"] is None  # the cloud was never tried
    assert plain["route_reason"] == "no-sensitive-content"  # no code: nothing to look up


def test_a_document_that_exhausts_its_parser_is_refused_and_the_gateway_stays_up(
    make_settings, embedder
) -> None:
    from pypdf import PdfWriter

    writer = PdfWriter()
    for _ in range(60_000):
        writer.add_blank_page(612, 792)
    pages = io.BytesIO()
    writer.write(pages)
    settings = make_settings(gateway={"api_key": KEY}, ingest={"parser_cpu_s": 1})
    with serve(create_app(settings, KnowledgeBase(settings, embedder=embedder))) as url:
        wait_ready(url)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
            load_samples(client)
            before = snapshot(client)
            r = upload(client, "pages.pdf", pages.getvalue())
            assert r.status_code == 422, r.text
            assert "more than 1 s of CPU (ingest.parser_cpu_s)" in r.json()["reason"]
            assert client.get("/healthz").json() == {"status": "ok"}
            assert snapshot(client) == before
