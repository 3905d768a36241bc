"""Whole collections as plain rows: what backups and the migration read."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pymilvus import MilvusClient

from services.kb import schema


def rows(client: MilvusClient, name: str, batch: int = 512) -> Iterator[dict[str, Any]]:
    """Every row of ``name`` as stored, without what Milvus derives (the BM25 sparse vector,
    computed again from the text wherever a row is written back: Milvus refuses it as input)."""
    iterator = client.query_iterator(name, batch_size=batch, filter="", output_fields=["*"])
    try:
        while page := iterator.next():
            for row in page:
                row.pop(schema.SPARSE, None)
                yield row
    finally:
        iterator.close()


def plain(value: Any) -> Any:
    """Milvus returns numpy floats and protobuf-backed lists; JSON wants plain values."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__iter__") and not isinstance(value, str | bytes):
        return [plain(v) for v in value]
    return value
