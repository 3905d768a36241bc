"""Debezium change events from one source table, turned into knowledge-update events.

Each row of ``sync.cdc.table`` is a document: ``doc_id`` is the prefix plus the
primary key, the text is the content column (parsed as txt/md/html), the title
and classification optionally come from columns. ``op`` ``c`` (insert), ``u``
(update) and ``r`` (snapshot read) become ``document.upsert`` events built with
the same parser and chunker as ingestion (embedded on apply); ``d`` becomes
``document.delete``; ``t`` (truncate) is refused. The revision is the source time
(``source.ts_ms``: the commit time of a change, the read time of a snapshot row),
so a snapshot taken earlier never overwrites a later update. Postgres tables need
``REPLICA IDENTITY FULL`` (otherwise an update that leaves a large text column
unchanged carries a placeholder instead of the text, which is refused). Kafka tombstones (the
null value Debezium sends after a delete, for compaction) carry nothing to do.

Both Debezium JSON layouts are accepted: with the converter's schema wrapper
(``{"schema": ..., "payload": {...}}``) and without.
"""

from __future__ import annotations

import json
from typing import Any

from services.config import CdcSettings
from services.kb.classification import parse_label
from services.kb.ingest import Ingestor, IngestResult, validate_doc_id
from services.sync.events import DocumentDelete, DocumentUpsert, EventChunk, InvalidEvent

_OPS = {"c": "insert", "u": "update", "r": "snapshot", "d": "delete"}
UNAVAILABLE = "__debezium_unavailable_value"
"""What Debezium sends for an unchanged TOASTed column when the table's REPLICA IDENTITY is not
FULL: never to be taken for the document's text."""


def translate(
    value: bytes | None, key: bytes | None, cdc: CdcSettings, ingestor: Ingestor
) -> DocumentUpsert | DocumentDelete | None:
    """The event for one Debezium message, None for a tombstone; ``InvalidEvent`` says
    why a message cannot be used (the consumer dead-letters it)."""
    if value is None:
        return None
    envelope = _payload(_json(value, "value"))
    op = envelope.get("op")
    if op == "t":
        raise InvalidEvent("Debezium op 't' (TRUNCATE) is not applied: delete the documents explicitly")
    if op not in _OPS:
        raise InvalidEvent(f"Debezium op {op!r} is not one of c, u, r, d")
    source = envelope.get("source")
    if not isinstance(source, dict):
        raise InvalidEvent("Debezium envelope has no source block")
    table = _table(source, cdc.table)
    if table != cdc.table:
        raise InvalidEvent(f"change from table {table!r}, but sync.cdc.table is {cdc.table!r}")
    ts_ms = source.get("ts_ms", envelope.get("ts_ms"))
    if not isinstance(ts_ms, int) or ts_ms < 0:
        raise InvalidEvent("Debezium envelope has no source.ts_ms commit time")
    revision = ts_ms * 1000
    origin = f"cdc:{cdc.table}"[:128]
    row = envelope.get("before" if op == "d" else "after")
    if not isinstance(row, dict):
        if op == "d" and key is not None:
            row = _payload(_json(key, "key"))  # REPLICA IDENTITY DEFAULT: the key holds the id
        else:
            raise InvalidEvent(f"Debezium op {op!r} without the {'before' if op == 'd' else 'after'} row")
    doc_id = _doc_id(row, cdc)
    if op == "d":
        return DocumentDelete(origin=origin, doc_id=doc_id, revision=revision, occurred_at=ts_ms / 1000)
    content = row.get(cdc.content_column)
    if not isinstance(content, str):
        raise InvalidEvent(f"column {cdc.content_column!r} is missing or not text")
    if content == UNAVAILABLE or row.get(cdc.title_column or "") == UNAVAILABLE:
        raise InvalidEvent(
            f"column {cdc.content_column!r} is not in the change (Debezium sent its unavailable-value "
            "placeholder): set REPLICA IDENTITY FULL on the source table"
        )
    title = row.get(cdc.title_column) if cdc.title_column else None
    label = None
    if cdc.classification_column and row.get(cdc.classification_column) is not None:
        try:
            label = parse_label(row[cdc.classification_column], f"column {cdc.classification_column!r}")
        except ValueError as exc:
            raise InvalidEvent(str(exc)) from None
    key_value = str(row[cdc.id_column])
    prepared = ingestor.prepare(
        content.encode(),
        f"{cdc.table}/{key_value}.{cdc.format}",
        doc_id=doc_id,
        labels=[label],
        title=str(title) if title else None,
        metadata={"cdc_table": cdc.table, "cdc_key": key_value},
    )
    if isinstance(prepared, IngestResult):
        raise InvalidEvent(f"row {key_value!r} cannot be ingested: {prepared.reason}")
    record = prepared.record
    return DocumentUpsert(
        origin=origin,
        doc_id=doc_id,
        revision=revision,
        occurred_at=ts_ms / 1000,
        version=record.version,
        content_hash=record.content_hash,
        classification=record.classification,
        source=record.source,
        title=record.title,
        metadata=record.metadata,
        acl=record.acl.stored(),
        chunks=[
            EventChunk(chunk_no=c.chunk_no, text=c.text, page=c.page, metadata=c.metadata)
            for c in prepared.chunks
        ],
    )


def _json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"Debezium message {what} is not JSON: {exc}") from None


def _payload(data: Any) -> dict[str, Any]:
    if isinstance(data, dict) and "payload" in data and "schema" in data:
        data = data["payload"]
    if not isinstance(data, dict):
        raise InvalidEvent("Debezium message is not a JSON object")
    return data


def _table(source: dict[str, Any], wanted: str) -> str:
    """``schema.table`` (Postgres, SQL Server) or ``db.table`` (MySQL), whichever the
    configured name uses; a bare configured name matches the table alone."""
    table = str(source.get("table", ""))
    if "." not in wanted:
        return table
    for scope in (source.get("schema"), source.get("db")):
        if scope and f"{scope}.{table}" == wanted:
            return wanted
    return f"{source.get('schema') or source.get('db')}.{table}"


def _doc_id(row: dict[str, Any], cdc: CdcSettings) -> str:
    if row.get(cdc.id_column) is None:
        raise InvalidEvent(f"row has no {cdc.id_column!r} (sync.cdc.id_column)")
    try:
        return validate_doc_id(f"{cdc.doc_id_prefix}{row[cdc.id_column]}")
    except ValueError as exc:
        raise InvalidEvent(str(exc)) from None
