"""Sign-in at the gateway, over real HTTP: a real OIDC provider process's tokens, service API
keys from a real key file, the bootstrap admin key; refusals before any body is read."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from services.auth.keys import KeyStore
from services.auth.principal import Role
from services.gateway.app import create_app
from services.kb.classification import Classification
from services.kb.service import KnowledgeBase
from tests.idp import AUDIENCE, OidcProvider
from tests.support import serve, wait_ready

BOOTSTRAP = "bootstrap-key-0123456789"


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[OidcProvider]:
    provider = OidcProvider(tmp_path).start()
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture
def site(make_settings, embedder, idp: OidcProvider, tmp_path: Path) -> Iterator[tuple[str, KeyStore]]:
    store = KeyStore(tmp_path / "keys.db")
    settings = make_settings(
        gateway={
            "api_key": BOOTSTRAP,
            "keys_file": str(store.path),
            "oidc": {"issuer": idp.issuer, "audience": [AUDIENCE], "jwks_max_age_s": 2},
        }
    )
    with serve(create_app(settings, KnowledgeBase(settings, embedder=embedder))) as url:
        wait_ready(url)
        yield url, store


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
    assert r.status_code == 503 and r.json()["detail"].startswith("identity provider unavailable")
    assert _search(url, BOOTSTRAP).status_code == 200  # other credentials do not depend on it
