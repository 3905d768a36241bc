"""The principal a request is answered for: who, in which groups, with which roles, and the
highest classification it may read (its clearance)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from services.kb.classification import Classification


class Role(StrEnum):
    """What a principal may do. Each role includes the ones before it."""

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
