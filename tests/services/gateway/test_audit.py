"""The gateway's audit trail over real HTTP: one sealed record per request with who, what, which
chunks (ids and labels, never text), the question's hash; refused sign-ins and admin changes are
recorded; the chain verifies with the CLI; and a log that cannot be written withholds the answer."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import httpx

from services.auth.keys import KeyStore
from services.gateway.app import create_app
from services.kb.service import KnowledgeBase
from tests.idp import OidcProvider
from tests.services.gateway.conftest import BOOTSTRAP, signin_settings
from tests.support import serve, wait_ready

CANARY = "The escrow release code for the Halvorsen account is QX-7731-ZETA."


def _records(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "audit.jsonl").read_text().splitlines()]


def _upload(url: str, name: str, text: str, **form: object) -> httpx.Response:
    files = {"file": (name, f"# Escrow\n\n{text}\n".encode())}
    h = {"Authorization": f"Bearer {BOOTSTRAP}"}
    return httpx.post(f"{url}/v1/documents", files=files, data={"source": name, **form}, headers=h)


def _verify(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "dualtrack"), "audit", "verify", "--dir", str(directory)],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def _fill(path: Path) -> None:
    """Write ``path`` until its filesystem is full."""
    with path.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 1024)
        except OSError:
            pass


def test_every_request_is_recorded_without_its_text(site, idp: OidcProvider, tmp_path: Path) -> None:
    url, _ = site
    audit = tmp_path / "audit"
    assert _upload(url, "escrow.md", CANARY, classification="confidential", groups=["*"]).status_code == 201
    question = "What is the escrow release code for the Halvorsen account?"
    alice = idp.token("alice", groups=["ops"])
    r = httpx.post(f"{url}/v1/search", json={"query": question}, headers={"Authorization": f"Bearer {alice}"})
    assert r.status_code == 200 and r.json()["hits"] == []  # internal clearance: nothing readable
    boss = {"Authorization": f"Bearer {BOOTSTRAP}"}
    r = httpx.post(f"{url}/v1/search", json={"query": question}, headers=boss)
    hit = r.json()["hits"][0]
    httpx.post(f"{url}/v1/search", json={"query": question}, headers={"Authorization": "Bearer wrong"})
    httpx.get(f"{url}/v1/documents/escrow.md", headers={"Authorization": f"Bearer {alice}"})
    change = {"classification": "internal", "reason": "declassified after closing"}
    assert httpx.put(f"{url}/v1/documents/escrow.md/access", json=change, headers=boss).status_code == 200
    httpx.get(f"{url}/healthz")  # probes are not audited

    everything = _records(audit)
    begun = [x for x in everything if x.get("phase") == "begin"]  # writes are recorded before they act
    assert [(x["method"], x["path"]) for x in begun] == [
        ("POST", "/v1/documents"),
        ("PUT", "/v1/documents/escrow.md/access"),
    ]
    records = [x for x in everything if "phase" not in x]
    assert [(x["action"], x["status"]) for x in records] == [
        ("upload", 201),
        ("search", 200),
        ("search", 200),
        ("signin", 401),
        ("get", 404),
        ("set_access", 200),
    ]
    upload, denied, found, signin, get, relabel = records
    assert upload["detail"]["classification"] == "confidential" and upload["detail"]["acl"] == ["*"]
    assert denied["principal"] == {"subject": "alice", "kind": "user", "issuer": idp.issuer}
    assert denied["question"] == {"sha256": hashlib.sha256(question.encode()).hexdigest()}
    assert "results" not in denied
    assert found["principal"]["kind"] == "bootstrap"
    assert found["results"][0] == {
        "chunk_id": hit["chunk_id"],
        "doc_id": "escrow.md",
        "classification": "confidential",
    }
    assert signin["principal"] is None
    assert get["target"] == {"doc_id": "escrow.md"}
    assert relabel["detail"]["lowered"] is True and relabel["detail"]["reason"] == change["reason"]
    raw = (audit / "audit.jsonl").read_text()
    assert "QX-7731" not in raw and "Halvorsen" not in raw  # neither passages nor questions
    assert r.headers["X-Request-ID"] == found["request_id"]

    # bad input is a 422 without the input echoed (a lone surrogate, here), and still recorded
    r = httpx.post(
        f"{url}/v1/search",
        content=b'{"query": "\\ud800 escrow", "top_k": 0}',
        headers={**boss, "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and "ud800" not in r.text
    assert _records(audit)[-1]["status"] == 422

    ok = _verify(audit)
    assert ok.returncode == 0 and "9 records intact, from the first record to seq 9" in ok.stdout, ok.stderr
    path = audit / "audit.jsonl"
    path.write_text(path.read_text().replace('"status":404', '"status":200'))
    bad = _verify(audit)
    assert bad.returncode == 1 and "audit.jsonl:6: seq 6 was altered" in bad.stderr


def test_questions_are_kept_as_text_only_where_a_site_opts_in(make_settings, embedder, tmp_path) -> None:
    settings = make_settings(gateway={"api_key": BOOTSTRAP}, audit={"questions": "text"})
    with serve(create_app(settings, KnowledgeBase(settings, embedder=embedder))) as url:
        wait_ready(url)
        httpx.post(
            f"{url}/v1/search",
            json={"query": "parking rules"},
            headers={"Authorization": f"Bearer {BOOTSTRAP}"},
        )
    assert _records(tmp_path / "audit")[0]["question"] == {"text": "parking rules"}


def test_a_log_that_cannot_be_written_withholds_the_answer(make_settings, embedder, idp, tmp_path) -> None:
    """A real full filesystem (a 64 KiB tmpfs) under the audit log."""
    audit = tmp_path / "audit"
    audit.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(audit)], check=True)
    try:
        settings = signin_settings(make_settings, idp, KeyStore(tmp_path / "keys.db"))
        with serve(create_app(settings, KnowledgeBase(settings, embedder=embedder))) as url:
            wait_ready(url)
            h = {"Authorization": f"Bearer {BOOTSTRAP}"}
            assert httpx.post(f"{url}/v1/search", json={"query": "parking"}, headers=h).status_code == 200
            _fill(audit / "filler")
            # the log file's last page may still have room: ask until the disk is really full
            codes = [httpx.post(f"{url}/v1/search", json={"query": "parking"}, headers=h) for _ in range(12)]
            refused = [r for r in codes if r.status_code != 200]
            assert refused and all(r.status_code == 503 for r in refused)
            assert "audit log cannot be written" in refused[0].json()["detail"]
            assert "hits" not in refused[0].text
            (audit / "filler").unlink()
            assert httpx.post(f"{url}/v1/search", json={"query": "parking"}, headers=h).status_code == 200
        # nothing torn: every record that was written is whole and chained
        assert _verify(audit).returncode == 0
    finally:
        subprocess.run(["umount", str(audit)], check=True)


def test_a_batch_upload_is_recorded_per_document_without_its_text(site, tmp_path: Path) -> None:
    url, _ = site
    files = [
        ("files", ("escrow.md", f"# Escrow\n\n{CANARY}\n".encode())),
        ("files", ("broken.md", "Gr\xfc\xdfe".encode("latin-1"))),
    ]
    items = json.dumps([{"source": "escrow.md", "classification": "confidential"}, {"source": "broken.md"}])
    r = httpx.post(
        f"{url}/v1/documents/batch",
        files=files,
        data={"items": items},
        headers={"Authorization": f"Bearer {BOOTSTRAP}"},
    )
    assert [x["status"] for x in r.json()["results"]] == ["ingested", "rejected"]
    everything = _records(tmp_path / "audit")
    assert [(x["method"], x["path"]) for x in everything if x.get("phase") == "begin"] == [
        ("POST", "/v1/documents/batch")
    ]
    (record,) = [x for x in everything if "phase" not in x]
    assert record["action"] == "upload_batch" and record["status"] == 200
    assert [d["file"] for d in record["detail"]["documents"]] == [0, 1]
    assert [(d["doc_id"], d["outcome"], d["classification"]) for d in record["detail"]["documents"]] == [
        ("escrow.md", "ingested", "confidential"),
        ("broken.md", "rejected", None),
    ]
    text = (tmp_path / "audit" / "audit.jsonl").read_text()
    assert "QX-7731" not in text and "UTF-8" not in text  # neither the text nor a parser's reason
    assert _verify(tmp_path / "audit").returncode == 0
