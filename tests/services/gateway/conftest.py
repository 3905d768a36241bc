"""Fixtures for gateway tests that sign in: a real OIDC provider process and a gateway that
trusts it, with a key file and the bootstrap admin key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.auth.keys import KeyStore
from services.gateway.app import create_app
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


def signin_settings(make_settings: Any, idp: OidcProvider, store: KeyStore, **overrides: Any) -> Any:
    oidc = {"issuer": idp.issuer, "audience": [AUDIENCE], "jwks_max_age_s": 2, **overrides.pop("oidc", {})}
    gateway = {
        "api_key": BOOTSTRAP,
        "keys_file": str(store.path),
        "oidc": oidc,
        **overrides.pop("gateway", {}),
    }
    return make_settings(gateway=gateway, **overrides)


@pytest.fixture
def site(make_settings, embedder, idp: OidcProvider, tmp_path: Path) -> Iterator[tuple[str, KeyStore]]:
    store = KeyStore(tmp_path / "keys.db")
    settings = signin_settings(make_settings, idp, store)
    with serve(create_app(settings, KnowledgeBase(settings, embedder=embedder))) as url:
        wait_ready(url)
        yield url, store
