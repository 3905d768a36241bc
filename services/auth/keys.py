"""Service accounts: API keys that are stored hashed, scoped, expiring and revocable.

A key reads ``dtk_<id>_<secret>``: the id finds the record, the secret (32 random bytes) is
checked against its SHA-256 in constant time. A fast hash is the right one here: the
secret is random, not a password, so there is nothing to guess and a slow hash would only
slow every request. The plain key is shown once, when it is created, and never stored.

Records live in a SQLite file (mode 0600) that ``dualtrack keys`` writes and the gateway
reads on every lookup, so a revocation takes effect on the next request, without a
restart. Each record carries the principal it stands for: roles, groups and clearance.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.auth.principal import Principal, Role
from services.kb.classification import Classification

PREFIX = "dtk_"
_KEY = re.compile(r"^dtk_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_ID = re.compile(r"^[a-z0-9]{12}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    roles TEXT NOT NULL,
    groups_ TEXT NOT NULL,
    clearance TEXT NOT NULL,
    created TEXT NOT NULL,
    expires TEXT,
    revoked TEXT
)
"""


class KeyStoreError(ValueError):
    """A key operation is refused; the message names what is wrong."""


class KeyStoreUnavailable(RuntimeError):
    """The key file cannot be read (locked for too long, corrupt, unreadable)."""


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    roles: frozenset[Role]
    groups: frozenset[str]
    clearance: Classification
    created: datetime
    expires: datetime | None
    revoked: datetime | None

    def state(self, now: datetime) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"

    def principal(self) -> Principal:
        return Principal(self.name, "service", self.groups, self.roles, self.clearance)


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _when(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


class KeyStore:
    """The API keys of one gateway, in ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextmanager
    def _db(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)  # never readable by others
            try:
                os.fchmod(fd, 0o600)  # a file someone made looser is made private again
            finally:
                os.close(fd)
        elif not self.path.exists():
            raise KeyStoreError(f"no API keys at {self.path} (create one with `dualtrack keys create`)")
        db = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        try:
            db.execute(_SCHEMA)
            if write:
                db.execute("BEGIN IMMEDIATE")  # one writer at a time: check-then-insert holds
            yield db
            if write:
                db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def create(
        self,
        name: str,
        roles: Iterable[Role],
        groups: Iterable[str],
        clearance: Classification,
        expires_in: timedelta | None,
        now: datetime | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key: (the plain key, shown this once; its record)."""
        if not _NAME.match(name) or _ID.match(name):
            raise KeyStoreError(
                f"key name {name!r}: use 1-63 lower-case letters, digits, '.', '_' or '-', "
                "starting with a letter or digit, and not 12 letters and digits alone (a key id)"
            )
        roles = frozenset(roles)
        if not roles:
            raise KeyStoreError("a key needs at least one role (monitor, reader, contributor, admin)")
        groups = frozenset(groups)
        if expires_in is not None and expires_in <= timedelta(0):
            raise KeyStoreError(f"expires_in must be positive, got {expires_in}")
        now = now or datetime.now(UTC)
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        record = KeyRecord(
            key_id, name, roles, groups, clearance, now, now + expires_in if expires_in else None, None
        )
        with self._db(write=True) as db:
            existing = db.execute("SELECT revoked FROM api_keys WHERE name = ?", (name,)).fetchone()
            if existing is not None:
                if existing[0] is not None:
                    raise KeyStoreError(
                        f"a key named {name!r} was revoked; names are not reused (the audit trail "
                        "names keys): choose another name"
                    )
                raise KeyStoreError(f"a key named {name!r} exists; revoke it or choose another name")
            db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (
                    key_id,
                    name,
                    _sha256(secret),
                    ",".join(sorted(r.value for r in roles)),
                    "\n".join(sorted(groups)),
                    clearance.value,
                    now.isoformat(),
                    record.expires.isoformat() if record.expires else None,
                ),
            )
        return f"{PREFIX}{key_id}_{secret}", record

    def records(self) -> list[KeyRecord]:
        if not self.path.exists():
            return []
        with self._db() as db:
            rows = db.execute(
                "SELECT id, name, roles, groups_, clearance, created, expires, revoked FROM api_keys "
                "ORDER BY created"
            ).fetchall()
        return [self._record(row) for row in rows]

    @staticmethod
    def _record(row: tuple) -> KeyRecord:
        key_id, name, roles, groups, clearance, created, expires, revoked = row
        return KeyRecord(
            key_id,
            name,
            frozenset(Role(r) for r in roles.split(",") if r),
            frozenset(g for g in groups.split("\n") if g),
            Classification(clearance),
            datetime.fromisoformat(created),
            _when(expires),
            _when(revoked),
        )

    def revoke(self, key: str, now: datetime | None = None) -> KeyRecord:
        """Revoke by id or name; revoking twice is refused (it says when it was)."""
        now = now or datetime.now(UTC)
        with self._db(write=True) as db:
            row = db.execute(
                "SELECT id, name, roles, groups_, clearance, created, expires, revoked FROM api_keys "
                "WHERE id = ? OR name = ?",
                (key, key),
            ).fetchone()
            if row is None:
                raise KeyStoreError(f"no API key with id or name {key!r}")
            record = self._record(row)
            if record.revoked is not None:
                raise KeyStoreError(f"key {record.name!r} was revoked at {record.revoked.isoformat()}")
            db.execute("UPDATE api_keys SET revoked = ? WHERE id = ?", (now.isoformat(), record.id))
        return KeyRecord(**{**record.__dict__, "revoked": now})

    def authenticate(self, key: str, now: datetime | None = None) -> Principal | None:
        """The principal of a valid, unexpired, unrevoked key; None for anything else (the
        caller answers 401 without saying which: a key's existence is not disclosed)."""
        match = _KEY.match(key)
        if match is None or not self.path.exists():
            return None
        key_id, secret = match.groups()
        try:  # read-only, and never waiting long: a request is waiting
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
            try:
                row = db.execute(
                    "SELECT id, name, roles, groups_, clearance, created, expires, revoked, sha256 "
                    "FROM api_keys WHERE id = ?",
                    (key_id,),
                ).fetchone()
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise KeyStoreUnavailable(f"cannot read the API keys in {self.path}: {exc}") from None
        if row is None or not hmac.compare_digest(row[-1], _sha256(secret)):
            return None
        record = self._record(row[:-1])
        if record.state(now or datetime.now(UTC)) != "active":
            return None
        return record.principal()
