"""Sign-in at the gateway, over real HTTP: a real OIDC provider process's tokens, service API
keys from a real key file, the bootstrap admin key; refusals before any body is read."""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from services.auth.principal import Role
from services.kb.classification import Classification
from tests.idp import OidcProvider
from tests.services.gateway.conftest import BOOTSTRAP
from tests.support import SAMPLES


def _search(url: str, credential: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    return httpx.post(f"{url}/v1/search", json={"query": "vacation"}, headers=headers, timeout=60)


def test_each_kind_of_credential_signs_in(site, idp: OidcProvider) -> None:
    url, store = site
    assert _search(url, idp.token("alice", groups=["finance"])).status_code == 200
    day = timedelta(days=1)
    key, _ = store.create("search-bot", [Role.READER], ["finance"], Classification.INTERNAL, day)
    assert _search(url, key).status_code == 200
    assert _search(url, BOOTSTRAP).status_code == 200


def test_a_revoked_key_is_refused_on_the_next_request(site) -> None:
    url, store = site
    key, record = store.create("ci-bot", [Role.READER], [], Classification.PUBLIC, timedelta(days=1))
    assert _search(url, key).status_code == 200
    store.revoke(record.id)
    r = _search(url, key)
    assert r.status_code == 401 and r.json()["detail"] == "unknown, expired or revoked API key"


@pytest.mark.parametrize(
    "claims, reason",
    [
        ({"groups": ["x"], "exp": int(time.time()) - 60}, "the token has expired"),
        ({"groups": ["x"], "aud": "another-app"}, "meant for another audience"),
        ({"groups": 5}, "'groups' claim must be a list"),
    ],
)
def test_bad_tokens_get_401_with_the_reason(site, idp: OidcProvider, claims: dict, reason: str) -> None:
    r = _search(site[0], idp.token("mallory", **claims))
    assert r.status_code == 401 and reason in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"


def test_nothing_or_nonsense_is_refused(site) -> None:
    url, _ = site
    assert _search(url, None).json()["detail"].startswith("sign in: send `Authorization: Bearer")
    assert _search(url, "wrong").json()["detail"] == "missing or wrong API key or token"
    assert _search(url, "dtk_000000000000_" + "A" * 43).status_code == 401
    assert httpx.get(f"{url}/healthz").status_code == 200  # probes stay open


@pytest.mark.parametrize("path", ["/v1/search", "/v1/chat/completions", "/v1/ask", "/v1/documents"])
def test_an_anonymous_request_is_refused_before_its_body_is_read(site, path: str) -> None:
    host, port = site[0].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        # announces 100 MB and sends none of it: an answer can only come from the headers
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000000\r\n\r\n".encode()
        )
        started = time.monotonic()
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 401"), reply
    assert time.monotonic() - started < 5


def test_a_down_provider_is_a_clear_503_once_its_keys_are_too_old(site, idp: OidcProvider) -> None:
    url, _ = site
    token = idp.token("grace", groups=["everyone"])
    assert _search(url, token).status_code == 200
    idp.stop()
    time.sleep(2.5)  # past jwks_max_age_s
    r = _search(url, token)
    assert r.status_code == 503 and r.json()["detail"] == "identity provider unavailable: try again shortly"
    assert _search(url, BOOTSTRAP).status_code == 200  # other credentials do not depend on it
    assert "http://" not in r.text  # no internal URLs to anonymous clients


def test_writing_needs_the_contributor_role(site, idp: OidcProvider) -> None:
    url, store = site
    day = timedelta(days=1)
    reader, _ = store.create("reader-bot", [Role.READER], [], Classification.INTERNAL, day)
    writer, _ = store.create("writer-bot", [Role.CONTRIBUTOR], [], Classification.INTERNAL, day)
    files = {"file": ("note.md", b"# Note\n\nThe canteen opens at noon on weekdays.\n")}
    for who in (reader, idp.token("alice", groups=["everyone"])):  # a signed-in user is a reader
        headers = {"Authorization": f"Bearer {who}"}
        r = httpx.post(f"{url}/v1/documents", files=files, headers=headers, timeout=60)
        assert r.status_code == 403 and "needs the contributor role" in r.json()["detail"], r.text
        r = httpx.delete(f"{url}/v1/documents/note.md", headers=headers, timeout=60)
        assert r.status_code == 403
    headers = {"Authorization": f"Bearer {writer}"}
    form = {"source": "note.md"}
    r = httpx.post(f"{url}/v1/documents", files=files, data=form, headers=headers, timeout=60)
    assert r.status_code == 201, r.text
    assert httpx.delete(f"{url}/v1/documents/{r.json()['doc_id']}", headers=headers).status_code == 204


def test_reads_are_narrowed_to_the_principals_clearance(site) -> None:
    url, store = site
    admin = {"Authorization": f"Bearer {BOOTSTRAP}"}
    rel = "confidential/project-falcon-acquisition.md"
    r = httpx.post(
        f"{url}/v1/documents",
        files={"file": (Path(rel).name, (SAMPLES / rel).read_bytes())},
        data={"source": rel, "classification": "confidential"},
        headers=admin,
        timeout=60,
    )
    assert r.status_code == 201, r.text
    doc = r.json()["doc_id"]
    chunk = httpx.get(f"{url}/v1/documents/{doc}", headers=admin).json()["chunk_list"][0]["id"]
    day = timedelta(days=1)
    low, _ = store.create("low", [Role.CONTRIBUTOR], [], Classification.INTERNAL, day)
    high, _ = store.create("high", [Role.READER], [], Classification.CONFIDENTIAL, day)
    q = {"query": "Which company does the Falcon acquisition target?"}
    for key, sees in ((low, False), (high, True)):
        h = {"Authorization": f"Bearer {key}"}
        hits = httpx.post(f"{url}/v1/search", json=q, headers=h, timeout=60).json()["hits"]
        assert any(x["doc_id"] == doc for x in hits) is sees
        widened = {**q, "filter": {"classifications": ["confidential"]}}  # the client cannot widen it
        hits = httpx.post(f"{url}/v1/search", json=widened, headers=h, timeout=60).json()["hits"]
        assert any(x["doc_id"] == doc for x in hits) is sees
        listed = httpx.get(f"{url}/v1/documents", headers=h).json()["documents"]
        assert any(d["doc_id"] == doc for d in listed) is sees
        for path in (f"/v1/documents/{doc}", f"/v1/documents/{doc}/chunks/{chunk}"):
            assert httpx.get(f"{url}{path}", headers=h).status_code == (200 if sees else 404)
        ask = httpx.post(f"{url}/v1/ask", json={"question": q["query"]}, headers=h, timeout=60).json()
        assert any(c["doc_id"] == doc for c in ask["citations"]) is sees
    # not readable is not found, for deletes too: the contributor cannot remove what it cannot see
    r = httpx.delete(f"{url}/v1/documents/{doc}", headers={"Authorization": f"Bearer {low}"})
    assert r.status_code == 404 and r.json()["detail"] == f"no document {doc!r}"


def test_a_short_bootstrap_key_is_refused_at_start_up(tmp_path: Path) -> None:
    from services.auth.authenticator import Authenticator
    from services.config import ConfigError, GatewaySettings

    with pytest.raises(
        ConfigError, match="gateway.api_key: the bootstrap admin key is 6 characters; use at least 16"
    ):
        Authenticator(GatewaySettings(api_key="secret"))
    short = tmp_path / "key"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match="api_key_file = .*: the bootstrap admin key is 3 characters"):
        Authenticator(GatewaySettings(api_key_file=short))
