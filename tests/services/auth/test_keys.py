"""Service API keys: hashed at rest, scoped, expiring, revocable, on a real SQLite file."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.auth.keys import KeyStore, KeyStoreError, KeyStoreUnavailable
from services.auth.principal import Role
from services.kb.classification import Classification

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def _create(store: KeyStore, name: str = "ingest-bot", **kw):
    args = {
        "roles": [Role.CONTRIBUTOR],
        "groups": ["finance"],
        "clearance": Classification.CONFIDENTIAL,
        "expires_in": timedelta(days=90),
        "now": NOW,
    }
    return store.create(name, **{**args, **kw})


def test_a_key_authenticates_as_its_scoped_principal(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    key, record = _create(store)
    assert key.startswith(f"dtk_{record.id}_")
    p = store.authenticate(key, now=NOW + timedelta(days=1))
    assert p is not None and (p.subject, p.kind) == ("ingest-bot", "service")
    assert p.roles == {Role.CONTRIBUTOR} and p.groups == {"finance"}
    assert p.clearance is Classification.CONFIDENTIAL


def test_only_a_hash_is_stored_and_the_file_is_private(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    key, _ = _create(store)
    secret = key.rsplit("_", 1)[1]
    assert secret.encode() not in (tmp_path / "keys.db").read_bytes()
    assert stat.S_IMODE((tmp_path / "keys.db").stat().st_mode) == 0o600
    assert all(secret not in repr(r) for r in store.records())


def test_wrong_expired_and_revoked_keys_do_not_authenticate(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    key, record = _create(store)
    key_id = record.id
    assert store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B"), now=NOW) is None  # one char off
    assert store.authenticate(f"dtk_{'0' * 12}_{key.rsplit('_', 1)[1]}", now=NOW) is None  # unknown id
    assert store.authenticate("Bearer nonsense", now=NOW) is None
    assert store.authenticate(key, now=NOW + timedelta(days=90)) is None  # expired
    assert store.records()[0].state(NOW + timedelta(days=91)) == "expired"
    store.revoke(key_id, now=NOW)
    assert store.authenticate(key, now=NOW) is None  # the next lookup sees it: no restart
    with pytest.raises(KeyStoreError, match="was revoked at 2026-12-02T12:00:00"):
        store.revoke("ingest-bot")
    assert [r.state(NOW) for r in store.records()] == ["revoked"]


def test_bad_key_requests_are_refused_with_the_reason(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    _create(store)
    with pytest.raises(KeyStoreError, match="a key named 'ingest-bot' exists"):
        _create(store)
    with pytest.raises(KeyStoreError, match="key name 'Bad Name!'"):
        _create(store, name="Bad Name!")
    with pytest.raises(KeyStoreError, match="at least one role"):
        _create(store, name="norole", roles=[])
    with pytest.raises(KeyStoreError, match="expires_in must be positive"):
        _create(store, name="past", expires_in=timedelta(days=-1))
    with pytest.raises(KeyStoreError, match="no API key with id or name 'ghost'"):
        store.revoke("ghost")
    assert [r.name for r in store.records()] == ["ingest-bot"]  # nothing else was stored


def test_names_cannot_pass_for_ids_and_revoked_names_stay_taken(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    with pytest.raises(KeyStoreError, match="not 12 letters and digits alone"):
        _create(store, name="7623521d4397")
    _create(store, name="ci-bot")
    store.revoke("ci-bot")
    with pytest.raises(KeyStoreError, match="a key named 'ci-bot' was revoked; names are not reused"):
        _create(store, name="ci-bot")


def test_a_loose_key_file_is_made_private_and_a_corrupt_one_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    path.touch(mode=0o666)
    path.chmod(0o666)
    store = KeyStore(path)
    key, _ = _create(store)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(KeyStoreUnavailable, match="cannot read the API keys"):
        store.authenticate(key)
