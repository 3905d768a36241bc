"""Who may read a document: its access list (ACL).

A document's ACL is a set of entries stored on every chunk and registry row:


``*``               every signed-in principal (the clearance still applies)
``group:<name>``    members of the identity provider's group (or a key's group)
``user:<subject>``  one principal, by its ``sub`` or service-key name

A principal matches the entries :func:`tokens_of` gives it. Several sources may state an
ACL (an upload field, a sidecar, front-matter, a path rule); the stored ACL is what *all*
of them allow (their intersection, ``*`` allowing everything), so no single source can
widen what another restricted: the same rule as for labels, where the most restrictive wins.
A document no source gave an ACL gets the configured default.

Each row holds the ACL twice: as a Milvus array (``schema.ACL``, the record, what an
``array_contains_any`` reads) and as its canonical key (``schema.ACL_KEY``: the sorted
entries joined by commas, which no entry contains). Search filters on the key, with
``acl_key in [...]`` over the distinct keys whose entries the reader matches: a scalar
comparison the engine evaluates column-wise (Milvus Lite runs array expressions row by row,
which made the array filter cost more than the search itself). The list of distinct keys
comes from the registry (:meth:`services.kb.store.KnowledgeStore.acl_keys`); a key missing
from a stale list can only hide documents, never show one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from services.kb import schema
from services.kb.classification import Classification, path_matches
from services.kb.filters import in_list

EVERYONE: Final = "*"
GROUP: Final = "group:"
USER: Final = "user:"
MAX_ENTRIES: Final = schema.ACL_CAPACITY

_NOTHING: Final = f'{schema.CLASSIFICATION} == ""'  # a filter no row matches
_NAME = re.compile(r"^[^\x00-\x1f\x7f,]+$")
_NAME_BYTES: Final = schema.ACL_ENTRY_BYTES - 56  # room for the prefix


class AclError(ValueError):
    """An ACL that cannot be stored; the message names where it came from and why."""


def _name(value: object, what: str, where: str) -> str:
    text = str(value).strip()
    try:
        size = len(text.encode())
    except UnicodeEncodeError:  # a lone surrogate
        size = _NAME_BYTES + 1
    if not _NAME.match(text) or size > _NAME_BYTES:
        raise AclError(
            f"{where}: {what} {value!r} must be 1-{_NAME_BYTES} bytes without commas or control characters"
        )
    return text


@dataclass(frozen=True, slots=True)
class Acl:
    """A set of ACL entries; ``Acl.everyone()`` allows every signed-in principal."""

    entries: frozenset[str]

    @classmethod
    def of(cls, groups: Iterable[object] = (), users: Iterable[object] = (), where: str = "acl") -> Acl:
        """From group and user names (``*`` as a group means everyone)."""
        entries: set[str] = set()
        for g in groups:
            name = _name(g, "group", where)
            entries.add(EVERYONE if name == EVERYONE else GROUP + name)
        for u in users:
            entries.add(USER + _name(u, "user", where))
        if not entries:
            raise AclError(f"{where}: an access list needs at least one group or user")
        if len(entries) > MAX_ENTRIES:
            raise AclError(f"{where}: {len(entries)} entries, over the limit of {MAX_ENTRIES}")
        return cls(frozenset(entries))

    @classmethod
    def parse_stored(cls, entries: Sequence[str], where: str = "acl") -> Acl:
        """Entries as stored or sent (``*``, ``group:x``, ``user:y``), checked one by one."""
        groups: list[str] = []
        users: list[str] = []
        for e in entries:
            if e == EVERYONE:
                groups.append(EVERYONE)
            elif e.startswith(GROUP) and e[len(GROUP) :] != EVERYONE:
                groups.append(e[len(GROUP) :])
            elif e.startswith(USER):
                users.append(e[len(USER) :])
            else:
                raise AclError(f"{where}: entry {e!r} is not *, group:<name> or user:<subject>")
        return cls.of(groups, users, where)

    @classmethod
    def everyone(cls) -> Acl:
        return cls(frozenset({EVERYONE}))

    @classmethod
    def from_stored(cls, values: Sequence[str] | None) -> Acl:
        """A stored array as read back from Milvus (a row without one allows nobody)."""
        return cls(frozenset(values or ()))

    @property
    def is_everyone(self) -> bool:
        return EVERYONE in self.entries

    @property
    def groups(self) -> list[str]:
        return sorted(
            EVERYONE if e == EVERYONE else e[len(GROUP) :]
            for e in self.entries
            if e == EVERYONE or e.startswith(GROUP)
        )

    @property
    def users(self) -> list[str]:
        return sorted(e[len(USER) :] for e in self.entries if e.startswith(USER))

    @property
    def key(self) -> str:
        """The canonical ``schema.ACL_KEY``: equal ACLs, equal keys."""
        return ",".join(self.stored())

    @classmethod
    def from_key(cls, key: str) -> Acl:
        return cls(frozenset(key.split(","))) if key else cls(frozenset())

    def stored(self) -> list[str]:
        """The sorted entries: what goes into the array field (and into the version hash)."""
        return sorted(self.entries)

    def allows(self, tokens: Iterable[str] | None) -> bool:
        """Whether a principal with ``tokens`` (``None``: one that sees everything) may read."""
        return tokens is None or not self.entries.isdisjoint(tokens)

    def within(self, tokens: Iterable[str]) -> bool:
        """Whether every entry is one of ``tokens``: a contributor may only grant access to
        groups it is in (and to itself)."""
        return self.entries <= set(tokens) - {EVERYONE}

    def __and__(self, other: Acl) -> Acl:
        if self.is_everyone:
            return other
        if other.is_everyone:
            return self
        return Acl(self.entries & other.entries)

    def __str__(self) -> str:
        return ", ".join(self.stored())


def combine(stated: Iterable[Acl | None], default: Acl, where: str) -> Acl:
    """What every stated ACL allows, or ``default`` when none is stated."""
    present = [a for a in stated if a is not None]
    if not present:
        return default
    result = present[0]
    for acl in present[1:]:
        result &= acl
    if not result.entries:
        listed = "; ".join(f"[{a}]" for a in present)
        raise AclError(
            f"{where}: its access lists have nobody in common ({listed}); "
            "state one that every source agrees with"
        )
    return result


def tokens_of(subject: str, groups: Iterable[str]) -> list[str]:
    """The entries a principal matches: everyone, its groups, itself."""
    return sorted({EVERYONE, USER + subject, *(GROUP + g for g in groups)})


@dataclass(frozen=True, slots=True)
class Reader:
    """What one principal may read, as the store applies it: labels up to its clearance and
    documents whose ACL it matches (``tokens``; ``None`` for a principal that matches every
    ACL, the bootstrap admin). ANDed with whatever filter the client sent, so that filter can
    narrow what comes back but never widen it."""

    labels: tuple[Classification, ...]
    tokens: tuple[str, ...] | None

    def expression(self, acl_keys: Iterable[str]) -> str:
        """The Milvus boolean expression over ``schema.CLASSIFICATION`` and ``schema.ACL_KEY``;
        ``acl_keys`` are the distinct stored keys, of which those the reader matches are listed."""
        if not self.labels:
            return _NOTHING  # no label is readable
        expr = in_list(schema.CLASSIFICATION, [c.value for c in self.labels])
        if self.tokens is not None:
            mine = sorted(k for k in acl_keys if Acl.from_key(k).allows(self.tokens))
            if not mine:
                return _NOTHING
            expr += " and " + in_list(schema.ACL_KEY, mine)
        return expr

    def may_read(self, label: Classification, acl: Acl) -> bool:
        return label in self.labels and acl.allows(self.tokens)


EVERYTHING: Final = Reader(tuple(Classification), None)
"""Reads without restriction: operator commands on the host (backup, migrate, sync apply)."""


@dataclass(frozen=True, slots=True)
class AclRule:
    """A glob over the document's path and the ACL it implies (see ``classification``)."""

    pattern: str
    acl: Acl


def acls_from_rules(path: str, rules: Sequence[AclRule]) -> list[Acl]:
    """ACLs of every rule whose glob matches ``path`` or a trailing part of it."""
    return [r.acl for r in rules if path_matches(path, r.pattern)]
