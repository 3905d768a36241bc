"""``POST /v1/documents/batch`` over real HTTP, against Milvus Lite with the packaged model: each
file is checked, authorized and ingested on its own (results in the order sent), the writes are
batched, and a bad file or a refused one changes nothing of what is stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.gateway.app import create_app
from services.kb.service import KnowledgeBase
from tests.services.gateway.test_gateway import KEY, _pdf_corrupt, snapshot, upload
from tests.services.gateway.test_permissions import CANARY_A, CANARY_B, gw  # noqa: F401 -- fixture
from tests.support import SAMPLES, serve, wait_ready

SAMPLE_FILES = (
    "handbook/employee-handbook.md",
    "policies/travel-and-expense-policy.pdf",
    "runbooks/database-failover.txt",
)


@pytest.fixture
def small(make_settings, embedder) -> Iterator[httpx.Client]:
    """A gateway with small batch limits: 3 files, 24 KiB in all."""
    settings = make_settings(
        gateway={"api_key": KEY}, ingest={"max_file_bytes": 24 * 1024, "max_batch_documents": 3}
    )
    with serve(create_app(settings, KnowledgeBase(settings, embedder=embedder))) as url:
        wait_ready(url)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            yield c


def _batch(
    client: httpx.Client,
    files: list[tuple[str, bytes]],
    items: list[dict] | str | None = None,
    **headers: str,
) -> httpx.Response:
    data = {"items": items if isinstance(items, str) else json.dumps(items)} if items is not None else {}
    return client.post(
        "/v1/documents/batch",
        files=[("files", (Path(name).name, content)) for name, content in files],
        data=data,
        headers=headers,
    )


def _samples() -> list[tuple[str, bytes]]:
    return [(rel, (SAMPLES / rel).read_bytes()) for rel in SAMPLE_FILES]


def test_a_batch_ingests_each_file_and_a_bad_one_stops_nothing(small: httpx.Client) -> None:
    files = [*_samples()[:2], ("broken.pdf", _pdf_corrupt())]
    items = [{"source": name} for name, _ in files]
    items[1]["classification"] = "confidential"
    items[0]["metadata"] = {"team": "people"}
    r = _batch(small, files, items)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["name"] for x in results] == [name for name, _ in files]  # in the order sent
    assert [x["status"] for x in results] == ["ingested", "ingested", "rejected"]
    assert results[1]["classification"] == "confidential" and results[0]["chunks"] > 0
    assert "corrupt or unreadable PDF" in results[2]["reason"]
    docs = {d["doc_id"]: d for d in small.get("/v1/documents").json()["documents"]}
    handbook, policy = results[0]["doc_id"], results[1]["doc_id"]
    assert set(docs) == {handbook, policy} and handbook == "handbook--employee-handbook.md"
    assert docs[handbook]["metadata"]["team"] == "people" and docs[handbook]["chunks"] == results[0]["chunks"]
    hit = small.post("/v1/search", json={"query": "How many vacation days do employees get?", "top_k": 1})
    assert hit.json()["hits"][0]["doc_id"] == handbook

    before = snapshot(small)
    again = _batch(small, files[:2], items[:2])
    assert [x["status"] for x in again.json()["results"]] == ["skipped", "skipped"]
    assert snapshot(small) == before


def test_a_bad_file_in_a_batch_keeps_its_stored_version(small: httpx.Client) -> None:
    rel = "policies/travel-and-expense-policy.pdf"
    assert upload(small, rel).status_code == 201
    before = snapshot(small)
    ok = b"# Ok\n\nParking is on level two.\n"
    files = [(rel, b"%PDF-1.4 truncated"), ("notes.exe", b"MZ"), ("ok.md", ok)]
    items = [{"source": rel}, {"source": "notes.exe"}, {"source": "ok.md", "classification": "secret"}]
    results = _batch(small, files, items).json()["results"]
    assert [x["status"] for x in results] == ["rejected"] * 3
    assert "unsupported file type '.exe'" in results[1]["reason"]
    assert "classification" in results[2]["reason"] and "secret" in results[2]["reason"]
    assert snapshot(small) == before


def test_the_same_document_twice_in_a_batch_keeps_the_last(small: httpx.Client) -> None:
    files = [
        ("a.md", b"# Parking\n\nVisitors park on level one.\n"),
        ("a.md", b"# Parking\n\nLevel three.\n"),
    ]
    results = _batch(small, files, [{"source": "a.md"}] * 2).json()["results"]
    assert [x["status"] for x in results] == ["ingested", "ingested"]
    doc = small.get("/v1/documents/a.md").json()
    assert doc["version"] == results[1]["version"] != results[0]["version"] and doc["chunks"] == 1
    r = small.post("/v1/search", json={"query": "Where do visitors park?", "score_threshold": -1})
    assert [h["text"] for h in r.json()["hits"] if h["doc_id"] == "a.md"] == ["Level three."]


def test_batch_limits_and_malformed_items_are_clear_errors(small: httpx.Client) -> None:
    before = snapshot(small)
    four = [(f"n{i}.md", f"# N\n\nnote {i}\n".encode()) for i in range(4)]
    r = _batch(small, four)
    assert r.status_code == 413 and "4 files, over the limit of 3 (ingest.max_batch_documents)" in r.text
    r = _batch(small, four[:2], [{"source": "n0.md"}])
    assert r.status_code == 422 and "items has 1 entries for 2 files" in r.text
    r = small.post("/v1/documents/batch", files=[("files", ("n0.md", b"x"))], data={"items": "[{"})
    assert r.status_code == 422 and "items is not valid JSON" in r.text
    r = small.post("/v1/documents/batch", files=[("files", ("n0.md", b"x"))], data={"items": '{"a": 1}'})
    assert r.status_code == 422 and "items must be a JSON array of per-file options, not dict" in r.text
    # the bytes of all files together stay within max_file_bytes: the whole batch is refused
    big = b"# Big\n\n" + b"word " * 2800  # 14 KiB
    r = _batch(small, [("b1.md", big), ("b2.md", big)])
    assert r.status_code == 413 and "over the limit of 24576 (ingest.max_file_bytes)" in r.text
    assert snapshot(small) == before
    anonymous = httpx.post(f"{small.base_url}/v1/documents/batch", files=[("files", ("x.md", b"x"))])
    assert anonymous.status_code == 401


def test_a_bad_entry_rejects_its_file_only(small: httpx.Client) -> None:
    """What is wrong with one entry of ``items`` (unknown key, long title, nested or non-finite
    metadata, a control character in the source) rejects that file; the others go in."""
    before = snapshot(small)
    bad = [
        ({"source": "k0.md", "colour": "red"}, "colour"),
        ({"source": "k1.md", "title": "t" * 201}, "title"),
        ({"source": "k2.md", "metadata": {"deep": {"x": 1}}}, "metadata 'deep' is dict"),
        ({"source": "k3.md", "metadata": {"x": 1e400}}, "metadata 'x' is not a finite number"),
        ({"source": "k4\u0000.md"}, "contains control characters"),
        ({"source": "k5.md", "doc_id": "a\nb"}, "doc_id"),
    ]
    files = [(f"k{i}.md", f"# K\n\nLocker {i} is by the lift.\n".encode()) for i in range(len(bad))]
    files.append(("ok.md", b"# Ok\n\nLocker keys are at the front desk.\n"))
    items = [entry for entry, _ in bad] + [{"source": "ok.md"}]
    results = []
    for at in range(0, len(files), 3):  # the fixture's batches take 3 files
        # 1e400 is valid JSON and no finite float: Python writes it as Infinity, which JSON is not
        r = _batch(small, files[at : at + 3], json.dumps(items[at : at + 3]).replace("Infinity", "1e400"))
        assert r.status_code == 200, r.text
        results += r.json()["results"]
    assert [x["status"] for x in results] == ["rejected"] * len(bad) + ["ingested"]
    for result, (_, needle) in zip(results, bad, strict=False):
        assert needle in result["reason"], result
        assert result["doc_id"] in (None, "k0.md", "k1.md", "k2.md", "k3.md"), result  # never an invalid id
    after = {d for d, _, _ in snapshot(small)[0]}
    assert after == {d for d, _, _ in before[0]} | {"ok.md"}
    nan = small.post(
        "/v1/documents", files={"file": ("nan.md", b"# N\n\nx\n")}, data={"metadata": '{"x": NaN}'}
    )
    assert nan.status_code == 422 and "NaN is not a number JSON allows" in nan.text


def test_a_batch_authorizes_each_file(gw) -> None:  # noqa: F811 -- the fixture
    """A contributor's batch: each file is checked as its own upload would be; a refused file
    discloses nothing of the document it would have replaced, and that one stays intact."""
    url, idp = gw
    from tests.services.gateway.conftest import BOOTSTRAP

    theirs = httpx.post(
        f"{url}/v1/documents",
        files={"file": ("theirs.md", f"# Spare keys\n\n{CANARY_B}\n".encode())},
        data={"source": "theirs.md", "groups": ["b"]},
        headers={"Authorization": f"Bearer {BOOTSTRAP}"},
    )
    assert theirs.status_code == 201
    writer = idp.token("wendy", groups=["a"], roles=["kb-writer"])
    reader = idp.token("rita", groups=["a"])
    files = [(n, f"# Spare keys\n\n{CANARY_A}\n".encode()) for n in ("mine.md", "wide.md", "theirs.md")]
    items = [{"source": "mine.md"}, {"source": "wide.md", "groups": ["*"]}, {"source": "theirs.md"}]
    with httpx.Client(base_url=url, timeout=120) as client:
        refused = _batch(client, files, items, Authorization=f"Bearer {reader}")
        assert refused.status_code == 403 and "contributor" in refused.text
        results = _batch(client, files, items, Authorization=f"Bearer {writer}").json()["results"]
        assert [x["status"] for x in results] == ["ingested", "refused", "refused"]
        assert results[0]["access"]["groups"] == ["a"]  # its own groups by default
        assert "only to your own groups" in results[1]["reason"]
        assert "belongs to a document you cannot read" in results[2]["reason"] and "group:b" not in str(
            results
        )
        stored = client.get("/v1/documents/theirs.md", headers={"Authorization": f"Bearer {BOOTSTRAP}"})
        assert stored.json()["version"] == theirs.json()["version"]
        assert (
            client.get("/v1/documents/wide.md", headers={"Authorization": f"Bearer {BOOTSTRAP}"}).status_code
            == 404
        )


def test_the_cli_sends_smaller_batches_when_one_is_over_the_limit(
    small: httpx.Client, tmp_path: Path
) -> None:
    """``kb ingest --batch 5`` against a gateway that takes 3 files per batch: the refused batch
    goes one by one, the next ones in smaller batches; every file is ingested, in order."""
    from typer.testing import CliRunner

    from dualtrack.cli import app

    for i in range(8):
        (tmp_path / f"f{i}.md").write_text(f"# F{i}\n\nShelf {i} holds the spare cables.\n")
    url = str(small.base_url)
    result = CliRunner().invoke(
        app,
        ["kb", "ingest", str(tmp_path), "--batch", "5", "--url", url, "--api-key", KEY],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "8 ingested, 0 skipped, 0 rejected" in result.output
    table = result.output.split("ingest summary", 1)[1]
    rows = [table.index(f"f{i}.md ") for i in range(8)]
    assert rows == sorted(rows)
    metrics = small.get("/metrics").text

    def requests(route: str, code: str) -> float:
        prefix = (
            f'dualtrack_http_request_duration_seconds_count{{method="POST",route="{route}",status="{code}"}} '
        )
        return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix))

    # 5 refused (413) and sent singly; then batches of 2: [f5, f6], then f7 alone
    assert requests("/v1/documents/batch", "413") == 1
    assert requests("/v1/documents", "201") == 6
    assert requests("/v1/documents/batch", "200") == 1
