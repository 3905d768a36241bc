"""The principal a request is answered for: who, in which groups, with which roles, and the
highest classification it may read (its clearance)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from services.kb.access import EVERYONE, Acl, Reader, tokens_of
from services.kb.classification import Classification


class Role(StrEnum):
    """What a principal may do. Each role includes the ones before it."""

    MONITOR = "monitor"
    """metrics and readiness details: what a Prometheus scrape or an operator's probe needs"""
    READER = "reader"
    """search, ask, chat"""
    CONTRIBUTOR = "contributor"
    """upload and delete documents within its groups"""
    ADMIN = "admin"
    """labels, ACLs, keys"""

    @property
    def rank(self) -> int:
        return list(Role).index(self)


@dataclass(frozen=True)
class Principal:
    subject: str
    """The identity provider's ``sub`` (users), or the key's name (service accounts)."""
    kind: Literal["user", "service", "bootstrap"]
    groups: frozenset[str]
    roles: frozenset[Role]
    clearance: Classification
    """The most sensitive label this principal may read."""
    issuer: str | None = None

    def has(self, role: Role) -> bool:
        """Whether any of the principal's roles includes ``role``."""
        return any(r.rank >= role.rank for r in self.roles)

    def may_read(self, label: Classification) -> bool:
        return label.rank <= self.clearance.rank

    def readable(self) -> list[Classification]:
        """The labels this principal may read, least sensitive first."""
        return [c for c in Classification if self.may_read(c)]

    @property
    def sees_every_acl(self) -> bool:
        """The bootstrap admin (and everyone, where sign-in is off) is on every access list."""
        return self.kind == "bootstrap"

    def tokens(self) -> list[str]:
        """The access-list entries this principal matches (``services.kb.access``). A subject or
        group no entry can hold (control characters) matches nothing, rather than failing."""
        return [t for t in tokens_of(self.subject, self.groups) if t.isprintable()]

    def reader(self) -> Reader:
        """What the store lets this principal read: labels up to its clearance, documents
        whose access list names it, one of its groups or everyone."""
        return Reader(tuple(self.readable()), None if self.sees_every_acl else tuple(self.tokens()))

    def own_acl(self) -> Acl:
        """The access list of a document this principal uploads without stating one: its groups,
        or itself when it has none."""
        return Acl.of(sorted(self.groups)) if self.groups else Acl.of(users=[self.subject])

    def may_manage(self, acl: Acl) -> bool:
        """Whether a contributor may replace or delete a document with ``acl``: an admin may any;
        others one shared with one of their groups or with them by name (not merely with
        everyone)."""
        return (
            self.has(Role.ADMIN)
            or self.sees_every_acl
            or not acl.entries.isdisjoint(set(self.tokens()) - {EVERYONE})
        )
