"""The Milvus-backed store: chunks, the active-version registry, search.

Write protocol for one document (see ``schema`` for why):

1. ``write_chunks``  -- upsert the new version's chunks (deterministic ids, so a
   retry or a concurrent identical ingest writes the same rows);
2. ``activate``      -- upsert the registry row naming the new version;
3. ``purge_stale``   -- delete the document's chunks of any other version.

Search filters every hit through the registry, so between steps 1 and 3 (or
after a crash anywhere) readers see exactly one complete version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import numpy as np
from pymilvus import AnnSearchRequest, CollectionSchema, MilvusClient, RRFRanker, WeightedRanker
from pymilvus.exceptions import MilvusException

from services.config import MilvusSettings
from services.kb import schema
from services.kb.access import Acl, Reader
from services.kb.classification import Classification
from services.kb.cleaning import DASHES
from services.kb.errors import (
    EngineUnsupported,
    KBError,
    LookupUnsupported,
    SchemaMismatch,
    StoreTimeout,
    StoreUnavailable,
)
from services.kb.filters import SearchFilter, in_list, literal
from services.kb.models import Chunk, Hit

log = logging.getLogger(__name__)

_FRAGMENT = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*")
"""What may be looked up verbatim (``fullmatch``, 4-64 characters): letters and digits, single
hyphens between them, so a fragment means itself in a LIKE pattern."""
_DASH = f"[-{DASHES}]"
_WORD = r"(?<![A-Za-z0-9-]){}(?![A-Za-z0-9-])"
"""A fragment as a whole word; a hyphen in it matches any dash (``_DASH``), and a typographic
dash next to it (an em dash in running text) is a word boundary."""
_LOOKUP_PAGE = 256
"""Candidate rows read per page of a verbatim lookup."""


class _LiteIteratorTimestamps(logging.Filter):
    """Milvus Lite gives an iterator no MVCC timestamp; pymilvus then warns on every iterator
    and uses the client's clock, which is right for a single-process engine."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to get mvccTs" not in record.getMessage()


logging.getLogger("pymilvus.client.iterator.query_iterator").addFilter(_LiteIteratorTimestamps())

_NO_INFIX = (
    'Milvus at {where} cannot look text up verbatim (LIKE "%code%" needs Milvus 2.4 or later): '
    "questions naming a code-like identifier are answered on the premises"
)

_NOT_LOADED = 101
"""Milvus error code for a search/query on a released collection."""

_SWITCH_S = 2.0
"""How long a request waits for a collection that is being switched to its rebuilt successor."""

_BM25_SINCE = (2, 5)
"""The first Milvus release with the BM25 function and sparse vectors."""

Ranker = RRFRanker | WeightedRanker
"""How a hybrid search merges its dense and BM25 lists (``services.kb.retriever.ranker``)."""


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    """A registry row: the active version of one document."""

    doc_id: str
    version: str
    content_hash: str
    classification: Classification
    source: str
    title: str
    chunks: int
    ingested_at: float
    metadata: dict[str, Any]
    acl: Acl

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> DocumentRecord:
        return cls(
            doc_id=row[schema.DOC_ID],
            version=row[schema.VERSION],
            content_hash=row[schema.CONTENT_HASH],
            classification=Classification(row[schema.CLASSIFICATION]),
            source=row[schema.SOURCE],
            title=row[schema.TITLE],
            chunks=int(row[schema.CHUNKS]),
            ingested_at=row[schema.INGESTED_AT] / 1000.0,
            metadata=_json(row.get(schema.METADATA)),
            acl=Acl.from_stored(row.get(schema.ACL)),
        )


def _json(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str | bytes) and value:
        return json.loads(value)
    return {}


def _chunk(row: dict[str, Any]) -> Chunk:
    entity = row.get("entity", row)
    return Chunk(
        id=entity.get(schema.ID, row.get("id")),
        doc_id=entity[schema.DOC_ID],
        version=entity[schema.VERSION],
        chunk_no=int(entity[schema.CHUNK_NO]),
        text=entity[schema.TEXT],
        classification=Classification(entity[schema.CLASSIFICATION]),
        source=entity[schema.SOURCE],
        page=int(entity[schema.PAGE]),
        metadata=_json(entity.get(schema.METADATA)),
        acl=Acl.from_stored(entity.get(schema.ACL)),
    )


class KnowledgeStore:
    """One knowledge base in Milvus (Lite embedded, Lite server or standalone)."""

    def __init__(self, settings: MilvusSettings, dimension: int) -> None:
        self.settings = settings
        self.dimension = dimension
        self.collection = settings.collection
        self.registry = schema.registry_name(settings.collection)
        self.where = display_uri(settings.uri)  # for messages: never the credentials
        self._client: MilvusClient | None = None
        self._connect_lock = threading.Lock()  # start-up and the first requests race to connect
        self._acl_keys: frozenset[str] = frozenset()
        self._acl_keys_read = -float("inf")  # monotonic time of the last registry read
        self._acl_lock = threading.Lock()
        self._acl_refreshing = False
        self._written_keys: set[str] = set()  # written since the background read began
        self._infix_like = True  # until Milvus says otherwise
        self.full_text = settings.full_text
        """Whether searches use the BM25 index: configured (``milvus.full_text``) and present. A
        collection built before it serves dense search until ``dualtrack kb migrate`` has rebuilt
        it; the switch is noticed within ``milvus.acl_refresh_s``."""
        self.pending: str | None = None
        """Why the configured BM25 index is not used yet (the collection predates it), else None."""
        self._pending_checked = 0.0
        self.engine = "Milvus"  # "Milvus Lite" or "Milvus vX.Y.Z" once connected

    # -- connection ------------------------------------------------------------------------

    @property
    def client(self) -> MilvusClient:
        client = self._client
        if client is None:
            self.connect()
            client = self._client
        assert client is not None
        return client

    def connect(self) -> None:
        """Open the client and create or validate both collections (once per process)."""
        with self._connect_lock:
            if self._client is None:
                self._connect()

    def _connect(self) -> None:
        uri = self.settings.uri
        token = self.settings.token.get_secret_value() if self.settings.token else ""
        try:
            client = MilvusClient(uri=uri, token=token, timeout=self.settings.timeout_s)
        except MilvusException as exc:
            raise StoreUnavailable(f"Milvus at {self.where} is unreachable: {milvus_message(exc)}") from None
        except Exception as exc:  # milvus-lite raises plain errors for a locked/invalid path
            raise StoreUnavailable(f"Milvus at {self.where} cannot be opened: {exc}") from None
        try:
            self._ensure_collections(client)
        except Exception:
            with contextlib.suppress(Exception):
                client.close()
            raise
        self._client = client  # published only once both collections are usable

    def close(self) -> None:
        if self._client is not None:
            # closing a dead connection must not mask the error that got us here
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def ping(self) -> str | None:
        """``None`` when Milvus answers and the collections are there, else why not. Never
        waits for a connection another thread is opening (creating and loading collections can
        take seconds on a server): a readiness probe answers within its own deadline."""
        if self._client is None:
            if not self._connect_lock.acquire(blocking=False):
                return f"connecting to Milvus at {self.where}"
            try:
                if self._client is None:
                    self._connect()
            except KBError as exc:
                return str(exc)
            finally:
                self._connect_lock.release()
        try:
            names = self.client.list_collections(timeout=min(self.settings.timeout_s, 3.0))
        except KBError as exc:
            return str(exc)
        except Exception as exc:
            # the client is shared with in-flight requests: report, never close it here;
            # pymilvus re-establishes its channel once Milvus answers again
            return f"Milvus at {self.where} is not answering: {milvus_message(exc)}"
        missing = [n for n in (self.collection, self.registry) if n not in names]
        try:  # a rebuilt collection is served through an alias, which the listing leaves out
            missing = [
                n
                for n in missing
                if not self.client.has_collection(n, timeout=min(self.settings.timeout_s, 3.0))
            ]
        except Exception as exc:
            return f"Milvus at {self.where} is not answering: {milvus_message(exc)}"
        if missing:
            return f"collection {missing[0]!r} is missing in Milvus at {self.where}"
        return None

    def call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one client call with this store's timeout, reload-on-restart and error
        translation; for companions sharing the connection (the sync ledger)."""
        return self._call(what, fn, *args, **kwargs)

    def _write(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A write: it may have to wait for Milvus Lite to seal its in-memory rows into a segment
        (seconds, inside the write that crossed the size line), so it gets ``write_timeout_s``.
        Giving up sooner is worse than waiting: a write sent again while the seal runs takes
        Lite minutes."""
        kwargs.setdefault("timeout", self.settings.write_timeout_s)
        return self._call(what, fn, *args, _setting="milvus.write_timeout_s", **kwargs)

    def _call(self, what: str, fn: Any, *args: Any, _setting: str = "milvus.timeout_s", **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self.settings.timeout_s)
        try:
            try:
                return fn(*args, **kwargs)
            except MilvusException as exc:
                if _missing(exc) and self._client is not None:
                    return self._when_back(fn, *args, **kwargs)
                if exc.code != _NOT_LOADED or self._client is None:
                    raise
                # a restarted Milvus comes back with collections released: load, retry once
                present = self._client.list_collections(timeout=self.settings.timeout_s)
                for name in (self.collection, self.registry, schema.ledger_name(self.collection)):
                    if name in present or self._client.has_collection(name, timeout=self.settings.timeout_s):
                        self._client.load_collection(name, timeout=self.settings.timeout_s)
                return fn(*args, **kwargs)
        except MilvusException as exc:
            raise StoreUnavailable(f"Milvus {what} failed at {self.where}: {milvus_message(exc)}") from None
        except grpc.RpcError as exc:  # pymilvus passes some transport errors on unwrapped
            raise _transport_error(exc, what, self.where, f"{_setting} ({kwargs['timeout']:g} s)") from None

    def _when_back(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A collection missing for a moment: the migration's first switch renames the old
        collection and puts an alias of the same name on the new one. Asked again for up to
        ``_SWITCH_S``, then the error stands."""
        deadline = time.monotonic() + _SWITCH_S
        while True:
            time.sleep(0.05)
            try:
                return fn(*args, **kwargs)
            except MilvusException as exc:
                if not _missing(exc) or time.monotonic() > deadline:
                    raise

    # -- schema ------------------------------------------------------------------------------

    def _ensure_collections(self, client: MilvusClient) -> None:
        self.check_engine(client)
        if self.exists(client, self.collection):  # a collection, or the alias of a rebuilt one
            self._validate_existing(client)
        elif self.exists(client, schema.generation_name(self.collection, 0)):
            raise SchemaMismatch(
                f"collection {self.collection!r} in Milvus at {self.where} is missing but its rebuild "
                f"({schema.generation_name(self.collection, 0)} and its successor) is there: a "
                "`dualtrack kb migrate` stopped while switching; run it again to finish the switch"
            )
        else:
            self.create_chunk_collection(client, self.collection)
        if not self.exists(client, self.registry):
            self.create_registry_collection(client, self.registry)
        for name in (self.collection, self.registry):
            self._call("load_collection", client.load_collection, name)

    def check_engine(self, client: MilvusClient) -> None:
        """Refuse an engine without BM25 when ``milvus.full_text`` asks for it, naming it."""
        self.engine = self._engine(client)
        if self.settings.full_text and not _has_bm25(self.engine):
            raise EngineUnsupported(
                f"{self.engine} at {self.where} has no BM25 full-text search (Milvus {_since()} or later, "
                "or Milvus Lite, has it), so hybrid search cannot run; upgrade Milvus, or set "
                "milvus.full_text = false to serve dense search only"
            )

    def exists(self, client: MilvusClient, name: str) -> bool:
        """Whether ``name`` is a collection or an alias of one."""
        return bool(self._call("has_collection", client.has_collection, name))

    def _engine(self, client: MilvusClient) -> str:
        """``Milvus Lite`` or ``Milvus v2.5.4`` (what the server reports), for capability checks
        and messages."""
        if self.settings.is_embedded:
            return "Milvus Lite"
        version = str(self._call("get_server_version", client.get_server_version)).strip()
        if version.startswith("milvus_lite"):  # a Milvus Lite server: "milvus_lite-3.2.2"
            return "Milvus Lite"
        return f"Milvus {version}" if version else "Milvus (version not reported)"

    def create_chunk_collection(self, client: MilvusClient, name: str) -> None:
        """An empty chunk collection with the configured index (also the migration's target)."""
        idx = self.settings.index
        params = client.prepare_index_params()
        params.add_index(
            field_name=schema.VECTOR,
            index_type=idx.type,
            metric_type=idx.metric,
            params={"params": schema.index_build_params(idx)} if idx.type != "FLAT" else {},
        )
        if self.full_text:
            params.add_index(field_name=schema.SPARSE, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        self._call(
            "create_collection",
            client.create_collection,
            name,
            schema=schema.chunk_schema(self.dimension, self.full_text),
            index_params=params,
            consistency_level="Session",  # a client always reads its own writes (the registry flip)
        )

    def create_registry_collection(self, client: MilvusClient, name: str) -> None:
        self._create_marker_collection(client, name, schema.registry_schema())

    def ensure_ledger(self) -> str:
        """Create the sync ledger collection (``<collection>_sync``) if missing; its name."""
        name = schema.ledger_name(self.collection)
        client = self.client
        if name not in self._call("list_collections", client.list_collections):
            self._create_marker_collection(client, name, schema.ledger_schema())
        self._call("load_collection", client.load_collection, name)
        return name

    def _create_marker_collection(self, client: MilvusClient, name: str, fields: CollectionSchema) -> None:
        """A collection of scalar rows; Milvus requires a vector field, so it gets the marker."""
        params = client.prepare_index_params()
        params.add_index(field_name=schema.MARKER, index_type="FLAT", metric_type="L2")
        self._call(
            "create_collection",
            client.create_collection,
            name,
            schema=fields,
            index_params=params,
            consistency_level="Session",
        )

    def _validate_existing(self, client: MilvusClient) -> None:
        desc = self._call("describe_collection", client.describe_collection, self.collection)
        fields = {f["name"]: f for f in desc["fields"]}
        vector = fields.get(schema.VECTOR)
        if vector is None or schema.DOC_ID not in fields:
            raise SchemaMismatch(
                f"collection {self.collection!r} exists but was not created by dualtrack "
                f"(no {schema.VECTOR!r}/{schema.DOC_ID!r} fields); set milvus.collection to another name"
            )
        missing = [f for f in schema.ACCESS_FIELDS if f not in fields] or self._registry_lacks(client)
        if missing:
            raise SchemaMismatch(
                f"collection {self.collection!r} in Milvus at {self.where} was created before documents "
                f"carried access lists as they are stored now (no {', '.join(map(repr, missing))} field); "
                "migrate it once with `dualtrack kb migrate` (it keeps every document and a copy of "
                "the old collections)"
            )
        if self.full_text and schema.SPARSE not in fields:
            self.full_text = False
            self.pending = (
                f"collection {self.collection!r} in Milvus at {self.where} was created before chunks "
                "carried a BM25 full-text index: serving dense search only until `dualtrack kb migrate` "
                "has rebuilt it (it does so while this collection keeps serving)"
            )
            self._pending_checked = time.monotonic()
            log.error("%s", self.pending)
        dim = int(vector.get("params", {}).get("dim", 0))
        if dim != self.dimension:
            raise SchemaMismatch(
                f"collection {self.collection!r} stores {dim}-d vectors but the embedding model "
                f"produces {self.dimension}-d vectors; use the model the collection was built with "
                "or set milvus.collection to a new name and re-ingest"
            )
        indexes = self._call("list_indexes", client.list_indexes, self.collection, field_name=schema.VECTOR)
        if indexes:
            info = self._call("describe_index", client.describe_index, self.collection, index_name=indexes[0])
            have = (str(info.get("index_type", "")).upper(), str(info.get("metric_type", "")).upper())
            want = (self.settings.index.type, self.settings.index.metric)
            if have[0] and have != want:
                raise SchemaMismatch(
                    f"collection {self.collection!r} has a {have[0]}/{have[1]} index but "
                    f"milvus.index asks for {want[0]}/{want[1]}; keep the existing settings or "
                    "ingest into a new collection"
                )

    def _registry_lacks(self, client: MilvusClient) -> list[str]:
        if self.registry not in self._call("list_collections", client.list_collections):
            return []  # created next, with the current schema
        desc = self._call("describe_collection", client.describe_collection, self.registry)
        have = {f["name"] for f in desc["fields"]}
        return [f for f in schema.ACCESS_FIELDS if f not in have]

    def acl_keys(self) -> frozenset[str]:
        """The distinct access lists of the registry (``schema.ACL_KEY`` values): what a
        reader's filter picks its keys from. The first call reads them; after that they are
        re-read in the background every ``milvus.acl_refresh_s``, for documents written by
        another process, while requests go on with the list they have. This process's writes
        are added as they are made. A list out of date can only leave out a new key, which
        hides the documents carrying it until the next read: it never shows one."""
        with self._acl_lock:
            if self._acl_keys_read == -float("inf"):  # nothing to go on with yet: read now
                self._acl_keys, self._acl_keys_read = self._read_acl_keys(), time.monotonic()
            elif (
                not self._acl_refreshing
                and time.monotonic() - self._acl_keys_read >= self.settings.acl_refresh_s
            ):
                self._acl_refreshing, self._written_keys = True, set()
                threading.Thread(target=self._refresh_acl_keys, name="acl-keys", daemon=True).start()
            return self._acl_keys

    def _refresh_acl_keys(self) -> None:
        keys: frozenset[str] | None = None
        try:
            keys = self._read_acl_keys()  # no lock held: requests go on meanwhile
        except KBError as exc:  # the old list stays (it can only hide); tried again after the interval
            log.warning("the access lists could not be re-read: %s", exc)
        finally:
            with self._acl_lock:
                if keys is not None:  # with what this process wrote while it was read
                    self._acl_keys = keys | self._written_keys
                self._acl_keys_read, self._acl_refreshing = time.monotonic(), False

    def _read_acl_keys(self) -> frozenset[str]:
        pages = self._pages(self.registry, "", [schema.ACL_KEY], 4096)
        return frozenset(r[schema.ACL_KEY] for page in pages for r in page)

    def _pages(self, name: str, expr: str, fields: list[str], batch: int) -> Iterator[list[dict[str, Any]]]:
        """Every row of ``name`` that ``expr`` matches, ``batch`` at a time (no offset limit)."""
        iterator = self._call(
            "query_iterator",
            self.client.query_iterator,
            name,
            batch_size=batch,
            filter=expr,
            output_fields=fields,
        )
        try:
            while page := self._call("query_iterator", lambda **_: iterator.next()):
                yield page
        finally:
            iterator.close()

    def _scope(self, reader: Reader) -> str:
        return reader.expression(self.acl_keys() if reader.tokens is not None else ())

    # -- registry ----------------------------------------------------------------------------

    def get_document(self, doc_id: str) -> DocumentRecord | None:
        rows = self._call(
            "query",
            self.client.query,
            self.registry,
            filter=f"{schema.DOC_ID} == {literal(doc_id)}",
            output_fields=list(schema.REGISTRY_OUTPUT_FIELDS),
        )
        return DocumentRecord.from_row(rows[0]) if rows else None

    def list_documents(self, *, reader: Reader, limit: int = 1000, offset: int = 0) -> list[DocumentRecord]:
        """A page of the registry, of the documents ``reader`` may read (filtered in Milvus, so a
        page is full whenever enough such documents exist)."""
        expr = f'{schema.DOC_ID} != "" and {self._scope(reader)}'
        rows = self._call(
            "query",
            self.client.query,
            self.registry,
            filter=expr,
            output_fields=list(schema.REGISTRY_OUTPUT_FIELDS),
            limit=limit,
            offset=offset,
        )
        return sorted((DocumentRecord.from_row(r) for r in rows), key=lambda d: d.doc_id)

    def iter_documents(self, batch: int = 500) -> Iterator[DocumentRecord]:
        """Every registry row, in pages (no 16,384-row window as with offset paging)."""
        iterator = self._call(
            "query_iterator",
            self.client.query_iterator,
            self.registry,
            batch_size=batch,
            filter=f'{schema.DOC_ID} != ""',
            output_fields=list(schema.REGISTRY_OUTPUT_FIELDS),
        )
        try:
            while rows := self._call("query_iterator", lambda **_: iterator.next()):
                yield from (DocumentRecord.from_row(r) for r in rows)
        finally:
            iterator.close()

    def get_documents(self, doc_ids: Sequence[str]) -> dict[str, DocumentRecord]:
        """``get_document`` for many documents in one query per thousand."""
        rows = self._registry_rows(doc_ids, list(schema.REGISTRY_OUTPUT_FIELDS))
        return {r[schema.DOC_ID]: DocumentRecord.from_row(r) for r in rows}

    def _registry_rows(self, doc_ids: Sequence[str], fields: list[str]) -> Iterator[dict[str, Any]]:
        """The registry rows of ``doc_ids`` (``fields`` of them), a query per thousand ids."""
        ids = sorted(set(doc_ids))
        for start in range(0, len(ids), 1000):
            yield from self._call(
                "query",
                self.client.query,
                self.registry,
                filter=in_list(schema.DOC_ID, ids[start : start + 1000]),
                output_fields=fields,
            )

    def version_counts(self, doc_ids: Sequence[str]) -> dict[tuple[str, str], int]:
        """``(doc_id, version) -> chunks stored`` for every version of these documents."""
        ids = sorted(set(doc_ids))
        out: dict[tuple[str, str], int] = {}
        for start in range(0, len(ids), 100):
            for page in self._pages(
                self.collection,
                in_list(schema.DOC_ID, ids[start : start + 100]),
                [schema.DOC_ID, schema.VERSION],
                4096,
            ):
                for r in page:
                    key = (r[schema.DOC_ID], r[schema.VERSION])
                    out[key] = out.get(key, 0) + 1
        return out

    def active_versions(self, doc_ids: Sequence[str]) -> dict[str, str]:
        if not doc_ids:
            return {}
        rows = self._call(
            "query",
            self.client.query,
            self.registry,
            filter=in_list(schema.DOC_ID, sorted(set(doc_ids))),
            output_fields=[schema.DOC_ID, schema.VERSION],
        )
        return {r[schema.DOC_ID]: r[schema.VERSION] for r in rows}

    def activate(self, *records: DocumentRecord) -> None:
        """Make each ``record.version`` the version search shows. One row per
        document, so the flip is a single-row upsert (atomic in Milvus)."""
        rows = [
            {
                schema.DOC_ID: r.doc_id,
                schema.VERSION: r.version,
                schema.CONTENT_HASH: r.content_hash,
                schema.CLASSIFICATION: r.classification.value,
                schema.SOURCE: r.source,
                schema.TITLE: r.title.encode()[:1000].decode(errors="ignore"),
                schema.CHUNKS: r.chunks,
                schema.INGESTED_AT: int(r.ingested_at * 1000),
                schema.METADATA: r.metadata,
                schema.ACL: r.acl.stored(),
                schema.ACL_KEY: r.acl.key,
                schema.MARKER: [0.0] * schema.MARKER_DIM,
            }
            for r in records
        ]
        self.upsert(self.registry, rows)
        with self._acl_lock:
            self._acl_keys |= {r.acl.key for r in records}
            self._written_keys |= {r.acl.key for r in records}  # kept across a read under way

    # -- chunks ------------------------------------------------------------------------------

    def write_chunks(
        self, chunks: Sequence[Chunk], vectors: np.ndarray, batch: int = 256, *, into: str | None = None
    ) -> None:
        """Upsert chunks with their vectors; ids are deterministic so this is idempotent. ``into``:
        another chunk collection than the one served (a migration's rebuild)."""
        if len(chunks) != len(vectors):
            raise ValueError("one vector per chunk is required")
        for start in range(0, len(chunks), batch):
            rows = [
                {
                    schema.ID: c.id,
                    schema.DOC_ID: c.doc_id,
                    schema.VERSION: c.version,
                    schema.CHUNK_NO: c.chunk_no,
                    schema.TEXT: c.text,
                    schema.VECTOR: vector,
                    schema.CLASSIFICATION: c.classification.value,
                    schema.SOURCE: c.source,
                    schema.PAGE: c.page,
                    schema.METADATA: c.metadata,
                    schema.ACL: c.acl.stored(),
                    schema.ACL_KEY: c.acl.key,
                }
                for c, vector in zip(
                    chunks[start : start + batch], vectors[start : start + batch].tolist(), strict=True
                )
            ]
            self.upsert(into or self.collection, rows)

    def upsert(self, name: str, rows: Sequence[dict[str, Any]]) -> None:
        """Upsert ``rows`` (dicts with the same keys) into collection ``name`` in one request,
        sent column by column through pymilvus' column-based upsert: ``MilvusClient.upsert``
        packs row by row, three times slower, which was the largest share of the sync
        consumer's own CPU time (docs/benchmarks.md)."""
        if not rows:
            return
        keys = rows[0].keys()
        if any(r.keys() != keys for r in rows):
            raise ValueError(f"rows for {name!r} must all have the fields {sorted(keys)}")
        columns = [{"name": k, "type": schema.FIELD_TYPES[k], "values": [r[k] for r in rows]} for k in keys]
        # the grpc handler MilvusClient.upsert calls too: it describes the collection per
        # request and retries as MilvusClient does
        self._write("upsert", self.client._get_connection().upsert, name, columns)

    def flush(self) -> None:
        """Seal growing segments so the ANN index serves them."""
        for name in (self.collection, self.registry):
            self._write("flush", self.client.flush, name)

    def purge_stale(self, doc_id: str, keep_version: str | None) -> None:
        """Delete the document's chunks of every version except ``keep_version``."""
        expr = f"{schema.DOC_ID} == {literal(doc_id)}"
        if keep_version is not None:
            expr += f" and {schema.VERSION} != {literal(keep_version)}"
        self._write("delete", self.client.delete, self.collection, filter=expr)

    def purge_stale_many(self, keep: dict[str, str], group: int = 100) -> None:
        """``purge_stale`` for many documents: each one's rows of every version but ``keep``'s,
        in one delete per ``group`` documents."""
        items = sorted(keep.items())
        for start in range(0, len(items), group):
            expr = " or ".join(
                f"({schema.DOC_ID} == {literal(d)} and {schema.VERSION} != {literal(v)})"
                for d, v in items[start : start + group]
            )
            self._write("delete", self.client.delete, self.collection, filter=expr)

    def delete_document(self, doc_id: str) -> bool:
        """Remove a document: registry row first (search hides it at once), then chunks."""
        existed = self.get_document(doc_id) is not None
        self._write(
            "delete", self.client.delete, self.registry, filter=f"{schema.DOC_ID} == {literal(doc_id)}"
        )
        self.purge_stale(doc_id, None)
        return existed

    def registered(self, doc_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """``doc_id -> (active version, chunk count)`` from the registry, for many documents."""
        rows = self._registry_rows(doc_ids, [schema.DOC_ID, schema.VERSION, schema.CHUNKS])
        return {r[schema.DOC_ID]: (r[schema.VERSION], int(r[schema.CHUNKS])) for r in rows}

    def origins(self, doc_ids: Sequence[str]) -> dict[str, str | None]:
        """``doc_id -> the origin it was synced from`` for registered documents; None for
        this site's own (uploaded or ingested here)."""
        rows = self._registry_rows(doc_ids, [schema.DOC_ID, schema.METADATA])
        return {r[schema.DOC_ID]: _json(r.get(schema.METADATA)).get(schema.SYNCED_FROM) or None for r in rows}

    def delete_chunks(self, chunk_ids: Sequence[str], batch: int = 1000) -> None:
        """Delete chunks by primary key: exact, and far cheaper for Milvus than a filter."""
        for start in range(0, len(chunk_ids), batch):
            self._write(
                "delete", self.client.delete, self.collection, ids=list(chunk_ids[start : start + batch])
            )

    def delete_documents(self, doc_ids: Sequence[str], group: int = 1000) -> None:
        """``delete_document`` for many documents: registry rows first, then their chunks."""
        ids = sorted(set(doc_ids))
        for start in range(0, len(ids), group):
            expr = in_list(schema.DOC_ID, ids[start : start + group])
            self._write("delete", self.client.delete, self.registry, filter=expr)
            self._write("delete", self.client.delete, self.collection, filter=expr)

    def count_chunks(
        self, doc_id: str | None = None, version: str | None = None, *, into: str | None = None
    ) -> int:
        parts = []
        if doc_id is not None:
            parts.append(f"{schema.DOC_ID} == {literal(doc_id)}")
        if version is not None:
            parts.append(f"{schema.VERSION} == {literal(version)}")
        rows = self._call(
            "query",
            self.client.query,
            into or self.collection,
            filter=" and ".join(parts),
            output_fields=["count(*)"],
        )
        return int(rows[0]["count(*)"]) if rows else 0

    def chunks_of(self, doc_id: str, version: str, *, into: str | None = None) -> list[Chunk]:
        rows = self._call(
            "query",
            self.client.query,
            into or self.collection,
            filter=f"{schema.DOC_ID} == {literal(doc_id)} and {schema.VERSION} == {literal(version)}",
            output_fields=list(schema.CHUNK_OUTPUT_FIELDS),
            limit=16384,
        )
        return sorted((_chunk(r) for r in rows), key=lambda c: c.chunk_no)

    def vectors_of(self, doc_id: str, version: str, *, into: str | None = None) -> np.ndarray:
        """The stored vectors of one version's chunks, in ``chunk_no`` order."""
        rows = self._call(
            "query",
            self.client.query,
            into or self.collection,
            filter=f"{schema.DOC_ID} == {literal(doc_id)} and {schema.VERSION} == {literal(version)}",
            output_fields=[schema.CHUNK_NO, schema.VECTOR],
            limit=16384,
        )
        rows = sorted(rows, key=lambda r: int(r[schema.CHUNK_NO]))
        return np.array([r[schema.VECTOR] for r in rows], dtype=np.float32).reshape(len(rows), self.dimension)

    def labels_containing(
        self, fragments: Sequence[str], among: Sequence[Classification]
    ) -> set[Classification]:
        """The labels (of ``among``) of chunks whose text holds one of ``fragments`` verbatim:
        identifiers (a project code, an account id) that a dense probe may not match. Fragments
        must be letters, digits and hyphens, so they mean themselves in a LIKE pattern; they are
        looked up 32 at a time, every one of them."""
        usable = [f for f in fragments if 4 <= len(f) <= 64 and _FRAGMENT.fullmatch(f)]
        if not usable or not among:
            return set()
        if not self._infix_like:
            raise LookupUnsupported(_NO_INFIX.format(where=self.where))
        labels = in_list(schema.CLASSIFICATION, [c.value for c in among])
        wanted = set(among)
        found: set[Classification] = set()
        for start in range(0, len(usable), 32):
            part = usable[start : start + 32]
            # a hyphen may be stored as any dash: "_" (one character) stands in for it, and the
            # regex below decides; every candidate is read (a cut-off would answer for them)
            likes = " or ".join(f'{schema.TEXT} like "%{f.replace("-", "_")}%"' for f in part)
            # whole words only: a prefix of a stored code must not match (no guessing it a
            # character at a time from the route)
            words = [re.compile(_WORD.format(re.escape(f).replace(r"\-", _DASH))) for f in part]
            for rows in self._like(f"{labels} and ({likes})"):
                found |= {
                    Classification(r[schema.CLASSIFICATION])
                    for r in rows
                    if any(w.search(r[schema.TEXT]) for w in words)
                }
                if found >= wanted:
                    return found
        return found

    def _like(self, expr: str) -> Iterator[list[dict[str, Any]]]:
        """Every row ``expr`` matches, a page at a time."""
        try:
            yield from self._pages(self.collection, expr, [schema.CLASSIFICATION, schema.TEXT], _LOOKUP_PAGE)
        except StoreUnavailable as exc:
            if "unsupported pattern" not in str(exc):
                raise
            self._infix_like = False  # Milvus before 2.4: only prefix patterns; asked once
            log.error("%s", _NO_INFIX.format(where=self.where))
            raise LookupUnsupported(_NO_INFIX.format(where=self.where)) from None

    # -- search ------------------------------------------------------------------------------

    def search(
        self,
        vectors: np.ndarray,
        limit: int,
        flt: SearchFilter | None = None,
        score_threshold: float | None = None,
        *,
        reader: Reader,
    ) -> list[list[Hit]]:
        """Dense search: the top ``limit`` hits per query vector that ``reader`` may read, active
        versions only, best first, scored by cosine similarity. ``flt`` (the client's) is ANDed
        with the reader's scope: it only narrows."""
        vectors = self._queries(vectors)
        fetch = self.fetch_size(limit)
        results = self._call(
            "search",
            self.client.search,
            self.collection,
            data=vectors.tolist(),
            limit=fetch,
            filter=self._filter(flt, reader),
            output_fields=list(schema.CHUNK_OUTPUT_FIELDS),
            search_params=schema.search_params(self.settings.index, self.settings.search, fetch),
        )
        return self._kept(results, limit, lambda h: self._similarity(float(h["distance"])), score_threshold)

    def keyword_search(
        self, queries: Sequence[str], limit: int, flt: SearchFilter | None = None, *, reader: Reader
    ) -> list[list[Hit]]:
        """BM25 search of the chunk text (``milvus.full_text``), scored by BM25 (unbounded, higher
        is better). A query with no indexable term (only stop words or punctuation) finds nothing."""
        self._need_full_text()
        fetch = self.fetch_size(limit)
        results = self._call(
            "search",
            self.client.search,
            self.collection,
            data=list(queries),
            anns_field=schema.SPARSE,
            limit=fetch,
            filter=self._filter(flt, reader),
            output_fields=list(schema.CHUNK_OUTPUT_FIELDS),
            search_params={"metric_type": "BM25"},
        )
        return self._kept(results, limit, lambda h: abs(float(h["distance"])), None)

    def hybrid_search(
        self,
        vector: np.ndarray,
        query: str,
        limit: int,
        ranker: Ranker,
        flt: SearchFilter | None = None,
        score_threshold: float | None = None,
        *,
        reader: Reader,
    ) -> list[Hit]:
        """Dense and BM25 search of one query, merged by ``ranker``, in one Milvus call; the
        reader's scope and ``flt`` filter both lists. The order is the fused one; each hit's
        score is still its cosine similarity to the query (so ``score_threshold`` means what it
        means for dense search, and a keyword-only hit below it is dropped)."""
        self._need_full_text()
        vector = self._queries(vector)[0]
        fetch = self.fetch_size(limit)
        expr = self._filter(flt, reader)
        dense = AnnSearchRequest(
            data=[vector.tolist()],
            anns_field=schema.VECTOR,
            param=schema.search_params(self.settings.index, self.settings.search, fetch),
            limit=fetch,
            expr=expr,
        )
        keyword = AnnSearchRequest(
            data=[query], anns_field=schema.SPARSE, param={"metric_type": "BM25"}, limit=fetch, expr=expr
        )
        results = self._call(
            "hybrid_search",
            self.client.hybrid_search,
            self.collection,
            [dense, keyword],
            ranker,
            limit=fetch,
            output_fields=[*schema.CHUNK_OUTPUT_FIELDS, schema.VECTOR],
        )

        def cosine(h: dict[str, Any]) -> float:
            return float(np.dot(vector, np.asarray(h["entity"][schema.VECTOR], dtype=np.float32)))

        return self._kept(results, limit, cosine, score_threshold, fused=True)[0]

    def _queries(self, vectors: np.ndarray) -> np.ndarray:
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.shape[1] != self.dimension:
            raise ValueError(f"query vectors are {vectors.shape[1]}-d; the store holds {self.dimension}-d")
        return vectors

    def _filter(self, flt: SearchFilter | None, reader: Reader) -> str:
        return " and ".join(f"({e})" for e in (flt.expression() if flt else "", self._scope(reader)) if e)

    def keyword_ready(self) -> bool:
        """Whether hybrid search can run now; while the collection predates the BM25 index, asks
        Milvus again every ``milvus.acl_refresh_s`` whether the migration has switched it."""
        if (
            self.pending is not None
            and time.monotonic() - self._pending_checked >= self.settings.acl_refresh_s
        ):
            self._pending_checked = time.monotonic()
            desc = self._call("describe_collection", self.client.describe_collection, self.collection)
            if schema.SPARSE in {f["name"] for f in desc["fields"]}:
                log.warning("collection %r now has its BM25 index: hybrid search resumes", self.collection)
                self.full_text, self.pending = True, None
        return self.full_text

    def _need_full_text(self) -> None:
        if not self.full_text:
            raise EngineUnsupported(
                self.pending
                or f"keyword search needs the BM25 full-text index, and milvus.full_text is false for "
                f"collection {self.collection!r} at {self.where}"
            )

    def _kept(
        self,
        results: Sequence[Sequence[dict[str, Any]]],
        limit: int,
        score: Callable[[dict[str, Any]], float],
        score_threshold: float | None,
        fused: bool = False,
    ) -> list[list[Hit]]:
        """Each result list without superseded versions and hits below ``score_threshold``, cut
        to ``limit``, in Milvus' order."""
        doc_ids = {h["entity"][schema.DOC_ID] for hits in results for h in hits}
        active = self.active_versions(sorted(doc_ids))
        out: list[list[Hit]] = []
        for hits in results:
            kept: list[Hit] = []
            for h in hits:
                chunk = _chunk(h)
                if active.get(chunk.doc_id) != chunk.version:
                    continue
                value = score(h)
                if score_threshold is not None and value < score_threshold:
                    continue
                kept.append(Hit(chunk=chunk, score=value, fused=float(h["distance"]) if fused else None))
                if len(kept) == limit:
                    break
            out.append(kept)
        return out

    @staticmethod
    def fetch_size(limit: int) -> int:
        """Candidates asked of Milvus for ``limit`` results: head-room for hits of
        superseded versions that the active-version check drops."""
        return limit * 2 + 4

    def _similarity(self, distance: float) -> float:
        """Cosine similarity from Milvus' distance: squared L2 between unit vectors is 2 - 2cos."""
        return 1.0 - distance / 2.0 if self.settings.index.metric == "L2" else distance


def display_uri(uri: str) -> str:
    """``uri`` without any ``user:password@`` part."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _has_bm25(engine: str) -> bool:
    """Whether ``engine`` (``KnowledgeStore._engine``) has the BM25 function: Milvus Lite does,
    a server from ``_BM25_SINCE`` on does; an unparseable version is given the benefit (creating
    the collection then says what is missing)."""
    if engine == "Milvus Lite":
        return True
    found = re.search(r"(\d+)\.(\d+)", engine)
    return found is None or (int(found[1]), int(found[2])) >= _BM25_SINCE


def _transport_error(exc: grpc.RpcError, what: str, where: str, deadline: str) -> StoreUnavailable:
    """A gRPC failure pymilvus does not wrap (it retries neither a deadline nor a cancel),
    said in the store's words rather than the channel's; ``deadline`` names the setting."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return StoreTimeout(
            f"Milvus {what} at {where} did not answer within {deadline}; the call may still complete "
            "(Milvus is busy: Milvus Lite, for one, seals its in-memory rows into a segment inside "
            "the write that takes them past 128 MiB, which takes seconds)"
        )
    return StoreUnavailable(f"Milvus {what} failed at {where}: {milvus_message(exc)}")


def _missing(exc: MilvusException) -> bool:
    """Milvus' "collection not found" (code 100 from 2.4 on; older servers say it in words)."""
    return (
        exc.code == 100
        or "can't find collection" in str(exc.message)
        or "not found[collection" in str(exc.message)
    )


def _since() -> str:
    return ".".join(map(str, _BM25_SINCE))


MILVUS_ERRORS = (MilvusException, grpc.RpcError)
"""What a pymilvus call raises: its own exception, or a bare gRPC error for the status codes it
does not retry (a deadline, a cancel, a refused permission)."""


def milvus_message(exc: BaseException) -> str:
    """What went wrong, without the channel's debug string (peer addresses, file and line of the
    gRPC core), which pymilvus appends to the messages of errors it gave up retrying."""
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        details = exc.details() if callable(getattr(exc, "details", None)) else ""
        return f"{code.name if code is not None else type(exc).__name__}: {details or 'no details'}"
    message = str(getattr(exc, "message", None) or exc)
    return message.split(", debug=", 1)[0]
