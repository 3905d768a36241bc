"""Document permissions at the gateway, over real HTTP with a real OIDC provider's tokens: users of
group A never see group B's passages through any endpoint (a forbidden document is "not found"),
contributors write only within their groups, and only an admin lowers a label or widens a list."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.auth.keys import KeyStore
from services.gateway.app import create_app
from services.kb.service import KnowledgeBase
from tests.idp import OidcProvider
from tests.services.gateway.conftest import BOOTSTRAP, signin_settings
from tests.support import serve, wait_ready

CANARY_A = "Team A keeps the spare keys in locker 4417."
CANARY_B = "Team B keeps the spare keys in locker 9032."
QUESTION = "Where are the spare keys kept?"


@pytest.fixture
def gw(make_settings, embedder, idp: OidcProvider, tmp_path: Path) -> Iterator[tuple[str, OidcProvider]]:
    store = KeyStore(tmp_path / "keys.db")
    claims = {
        "role_map": {"kb-admin": "admin", "kb-writer": "contributor"},
        "clearance_by_group": {"a": "confidential", "b": "confidential"},
    }
    settings = signin_settings(make_settings, idp, store, oidc={"claims": claims})
    with serve(create_app(settings, KnowledgeBase(settings, embedder=embedder))) as url:
        wait_ready(url)
        yield url, idp


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _upload(url: str, who: str, name: str, text: str, **form: object) -> httpx.Response:
    files = {"file": (name, f"# Spare keys\n\n{text}\n".encode())}
    return httpx.post(f"{url}/v1/documents", files=files, data={"source": name, **form}, headers=_as(who))


def _everything_seen(url: str, who: str, doc: str, chunk: str) -> str:
    """Every response body an endpoint gives ``who`` about the spare keys and ``doc``."""
    h = _as(who)
    bodies = [
        httpx.post(f"{url}/v1/search", json={"query": QUESTION, "top_k": 20}, headers=h, timeout=60).text,
        httpx.post(
            f"{url}/v1/search",
            json={"query": QUESTION, "score_threshold": -1, "filter": {"doc_ids": [doc]}},
            headers=h,
            timeout=60,
        ).text,
        httpx.post(f"{url}/v1/ask", json={"question": QUESTION}, headers=h, timeout=60).text,
        httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "dualtrack", "messages": [{"role": "user", "content": QUESTION}]},
            headers=h,
            timeout=60,
        ).text,
        httpx.get(f"{url}/v1/documents", headers=h).text,
        httpx.get(f"{url}/v1/documents/{doc}", headers=h).text,
        httpx.get(f"{url}/v1/documents/{doc}/chunks/{chunk}", headers=h).text,
    ]
    return "\n".join(bodies)


def test_group_a_never_sees_group_b(gw) -> None:
    url, idp = gw
    for name, text, group in (("a.md", CANARY_A, "a"), ("b.md", CANARY_B, "b")):
        r = _upload(url, BOOTSTRAP, name, text, groups=[group], classification="confidential")
        assert r.status_code == 201 and r.json()["access"] == {"groups": [group], "users": []}, r.text
    chunk_b = httpx.get(f"{url}/v1/documents/b.md", headers=_as(BOOTSTRAP)).json()["chunk_list"][0]["id"]
    alice = idp.token("alice", groups=["a"])
    seen = _everything_seen(url, alice, "b.md", chunk_b)
    assert "4417" in seen and "9032" not in seen and "b.md" not in seen.replace("'b.md'", "")
    for path in ("/v1/documents/b.md", f"/v1/documents/b.md/chunks/{chunk_b}"):
        r = httpx.get(f"{url}{path}", headers=_as(alice))
        assert r.status_code == 404  # the same answer as for a document that does not exist
        missing = httpx.get(f"{url}{path.replace('b.md', 'zz.md')}", headers=_as(alice))
        assert r.json()["detail"] == missing.json()["detail"].replace("zz.md", "b.md")
    r = httpx.delete(
        f"{url}/v1/documents/b.md", headers=_as(idp.token("alice", groups=["a"], roles=["kb-writer"]))
    )
    assert r.status_code == 404
    bob = idp.token("bob", groups=["b"])
    assert "9032" in _everything_seen(url, bob, "b.md", chunk_b)
    outsider = idp.token("eve", groups=["c"])  # internal clearance, in neither group
    seen = _everything_seen(url, outsider, "b.md", chunk_b)
    assert "4417" not in seen and "9032" not in seen


def test_contributors_write_within_their_groups(gw) -> None:
    url, idp = gw
    writer = idp.token("wendy", groups=["a"], roles=["kb-writer"])
    r = _upload(url, writer, "mine.md", CANARY_A)
    assert r.status_code == 201 and r.json()["access"]["groups"] == ["a"]  # its own groups by default
    r = _upload(url, writer, "wide.md", CANARY_A, groups=["*"])
    assert r.status_code == 403 and "only to your own groups" in r.json()["reason"]
    r = _upload(url, writer, "other.md", CANARY_A, groups=["b"])
    assert r.status_code == 403 and "'wendy' is in: a" in r.json()["reason"]
    theirs = _upload(url, BOOTSTRAP, "theirs.md", CANARY_B, groups=["b"])
    assert theirs.status_code == 201
    r = _upload(url, writer, "theirs.md", CANARY_A, doc_id="theirs.md")  # overwrite B's document
    assert r.status_code == 403 and "belongs to a document you cannot read" in r.json()["reason"]
    r = _upload(url, writer, "theirs.md", CANARY_A, doc_id="theirs.md", groups=["a"])
    assert r.status_code == 403 and "group:b" not in r.text  # its access list is not disclosed
    stored = httpx.get(f"{url}/v1/documents/theirs.md", headers=_as(BOOTSTRAP)).json()
    assert stored["version"] == theirs.json()["version"]  # intact
    both = _upload(url, BOOTSTRAP, "both.md", CANARY_B, groups=["a", "b"])
    r = _upload(url, writer, "both.md", CANARY_A, doc_id="both.md", groups=["b"])  # narrowed past herself
    assert r.status_code == 403 and "leaves out 'wendy'" in r.json()["reason"], r.text
    stored = httpx.get(f"{url}/v1/documents/both.md", headers=_as(BOOTSTRAP)).json()
    assert stored["version"] == both.json()["version"]  # intact
    r = _upload(url, writer, "both.md", CANARY_A, doc_id="both.md", groups=["a"])  # narrowed to her group
    assert r.status_code == 201 and r.json()["access"]["groups"] == ["a"], r.text
    assert _upload(url, BOOTSTRAP, "shared.md", CANARY_B, groups=["*"]).status_code == 201
    r = httpx.delete(f"{url}/v1/documents/shared.md", headers=_as(writer))  # shared with everyone only
    assert r.status_code == 403 and "shared with [*]" in r.json()["detail"]
    assert httpx.delete(f"{url}/v1/documents/mine.md", headers=_as(writer)).status_code == 204


def test_labels_go_up_on_reingest_and_only_an_admin_lowers_them(gw) -> None:
    url, idp = gw
    r = _upload(url, BOOTSTRAP, "memo.md", CANARY_A, classification="confidential", groups=["*"])
    assert r.json()["classification"] == "confidential"
    r = _upload(url, BOOTSTRAP, "memo.md", CANARY_A, classification="public")
    assert (r.status_code, r.json()["classification"]) == (200, "confidential")  # unchanged: skipped
    reader = idp.token("rita", groups=["c"])  # internal clearance
    assert httpx.get(f"{url}/v1/documents/memo.md", headers=_as(reader)).status_code == 404
    change = {"classification": "internal", "reason": "reviewed: nothing confidential"}
    for who in (reader, idp.token("wendy", groups=["a"], roles=["kb-writer"])):
        r = httpx.put(f"{url}/v1/documents/memo.md/access", json=change, headers=_as(who))
        assert r.status_code == 403 and "needs the admin role" in r.json()["detail"]
    admin = idp.token("ada", groups=["it"], roles=["kb-admin"])
    r = httpx.put(f"{url}/v1/documents/memo.md/access", json=change, headers=_as(admin))
    assert r.status_code == 200, r.text
    assert (r.json()["before"]["classification"], r.json()["after"]["classification"]) == (
        "confidential",
        "internal",
    )
    assert httpx.get(f"{url}/v1/documents/memo.md", headers=_as(reader)).status_code == 200
    r = httpx.put(f"{url}/v1/documents/memo.md/access", json={"groups": ["a"]}, headers=_as(admin))
    assert r.status_code == 422  # a reason is required
    r = httpx.put(
        f"{url}/v1/documents/memo.md/access", json={"groups": ["a,b"], "reason": "x"}, headers=_as(admin)
    )
    assert r.status_code == 422 and "without commas" in r.json()["detail"]
    r = httpx.put(f"{url}/v1/documents/nope.md/access", json=change, headers=_as(admin))
    assert r.status_code == 404
