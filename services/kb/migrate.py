"""Bring a knowledge base created before documents carried access lists up to the schema.

Milvus cannot add a field to an existing collection (not in Lite, nor in standalone before
2.6), so each collection that lacks one of the access fields (``acl``, ``acl_key``) is *copied*:
every row is written into ``<name>__migrating`` with its access list (the one it has, or for a
row stored before access lists the one the site's rules give it: ``access.path_rules`` on the
row's source, else ``access.default_groups``, exactly what an ingest of it would get), the
copy's row count is checked against the original's, and only then is the original renamed to
``<name>__premigration`` (kept, so nothing is lost; drop it once satisfied) and the copy renamed
into its place. (Chunk layout and the BM25 index are ``services.kb.relayout``'s: it runs next,
serving throughout.)

Safe to interrupt and rerun: before the swap the original is untouched (a rerun starts the
copy over); between the two renames the rerun finishes the swap. Stop the gateway and sync
consumer while it runs: writes made to the original during the copy would not be carried over.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from services.config import AccessSettings, Settings
from services.kb import schema
from services.kb.access import Acl, acls_from_rules, combine
from services.kb.errors import EngineUnsupported, KBError
from services.kb.rows import plain, rows
from services.kb.store import MILVUS_ERRORS, KnowledgeStore, display_uri, milvus_message

COPYING = "__migrating"
KEPT = "__premigration"
BATCH = 512

Progress = Callable[[str, int, int], None]
"""``(collection, rows copied, rows in all)`` after each batch."""


class MigrationError(KBError):
    """The migration could not finish; the message says where it stopped and what to do."""


@dataclass(frozen=True)
class Migrated:
    collection: str
    rows: int
    kept_as: str | None
    """The original's new name, or None when it needed no migration."""


def legacy_acl(source: str, access: AccessSettings) -> Acl:
    """The access list of a document stored before access lists existed: what its path
    rules give it, or the default."""
    return combine(acls_from_rules(source, access.rules()), access.default(), source)


def with_access(row: dict[str, Any], access: AccessSettings) -> dict[str, Any]:
    """``row`` (a chunk or registry row as stored or backed up) with both access fields: the
    ACL it has or its legacy one, and that ACL's key."""
    if schema.ACL not in row:
        row[schema.ACL] = legacy_acl(row[schema.SOURCE], access).stored()
    row[schema.ACL_KEY] = Acl.from_stored(row[schema.ACL]).key
    return row


def needs_migration(client: MilvusClient, name: str) -> bool:
    """Whether ``name`` lacks one of the access fields."""
    if not client.has_collection(name):
        return False
    have = {f["name"] for f in client.describe_collection(name)["fields"]}
    return not set(schema.ACCESS_FIELDS) <= have


def migrate(settings: Settings, progress: Progress | None = None) -> list[Migrated]:
    """Migrate the chunk collection and the registry of ``settings.milvus.collection``."""
    milvus = settings.milvus
    token = milvus.token.get_secret_value() if milvus.token else ""
    try:
        client = MilvusClient(uri=milvus.uri, token=token, timeout=milvus.timeout_s)
    except Exception as exc:
        raise MigrationError(f"Milvus at {display_uri(milvus.uri)} cannot be opened: {exc}") from None
    try:
        done = []
        for name in (milvus.collection, schema.registry_name(milvus.collection)):
            done.append(_migrate_one(client, settings, name, progress))
        return done
    except MILVUS_ERRORS as exc:
        raise MigrationError(
            f"migration stopped at Milvus {display_uri(milvus.uri)}: {milvus_message(exc)}; "
            "the original collections are intact or kept as *__premigration: rerun `dualtrack kb migrate`"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            client.close()


def _migrate_one(client: MilvusClient, settings: Settings, name: str, progress: Progress | None) -> Migrated:
    copy, kept = name + COPYING, name + KEPT
    names = client.list_collections()
    if name not in names:
        if copy in names and kept in names:  # interrupted between the renames: finish the swap
            client.rename_collection(copy, name)
            client.load_collection(name)
            return Migrated(name, _count(client, name), kept)
        return Migrated(name, 0, None)  # nothing stored yet: the gateway creates it
    chunks = name == settings.milvus.collection
    if not needs_migration(client, name):
        if copy in names:
            client.drop_collection(copy)  # a copy left over from a run that found it done
        return Migrated(name, _count(client, name), None)
    if kept in names:
        raise MigrationError(
            f"{kept!r} already exists (an earlier migration's original); drop or rename it first"
        )
    if copy in names:
        client.drop_collection(copy)  # an interrupted copy: start over from the untouched original
    store = KnowledgeStore(settings.milvus, _dimension(client, name) if chunks else 0)
    try:
        store.check_engine(client)  # the copy is created with the BM25 index when configured
    except EngineUnsupported as exc:
        raise MigrationError(str(exc)) from None
    if chunks:
        store.create_chunk_collection(client, copy)
    else:
        store.create_registry_collection(client, copy)
    client.load_collection(name)
    total = _count(client, name)
    copied = 0
    batch: list[dict[str, Any]] = []
    for row in map(plain, rows(client, name, BATCH)):
        batch.append(with_access(row, settings.access))
        if len(batch) >= BATCH:
            client.insert(copy, batch)
            copied += len(batch)
            batch = []
            if progress:
                progress(name, copied, total)
    if batch:
        client.insert(copy, batch)
        copied += len(batch)
    if progress:
        progress(name, copied, total)
    client.load_collection(copy)  # no flush: the counts need none (the rename seals it on Lite anyway)
    got = _count(client, copy)
    if got != total:
        client.drop_collection(copy)
        raise MigrationError(
            f"the copy of {name!r} holds {got} rows, the original {total}: nothing was changed"
        )
    client.rename_collection(name, kept)
    client.rename_collection(copy, name)
    client.load_collection(name)
    with contextlib.suppress(MilvusException):
        client.release_collection(kept)  # kept on disk, out of memory
    return Migrated(name, got, kept)


def _dimension(client: MilvusClient, name: str) -> int:
    fields = client.describe_collection(name)["fields"]
    return next(int(f["params"]["dim"]) for f in fields if f["name"] == schema.VECTOR)


def _count(client: MilvusClient, name: str) -> int:
    rows = client.query(name, filter="", output_fields=["count(*)"])
    return int(rows[0]["count(*)"]) if rows else 0
