"""Milvus boolean expressions built from validated values only.

Milvus Lite 3.x does not support expression templates, so values are rendered
as literals here: every string is escaped, control characters are refused,
metadata keys must be identifiers, and field names come from ``schema``, never
from the caller. ``" or 1==1`` therefore matches the text ``" or 1==1`` and
nothing else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.kb import schema
from services.kb.classification import Classification

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Scalar = str | bool | int | float


def literal(value: Scalar) -> str:
    """Render a scalar as a Milvus expression literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"filter value {value!r} is not a finite number")
        return repr(value)
    if not isinstance(value, str):
        raise ValueError(f"filter value {value!r} must be a string, number or boolean")
    if _CONTROL.search(value):
        raise ValueError(f"filter value {value!r} contains control characters")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def in_list(field: str, values: Iterable[Scalar]) -> str:
    """``field in [..]`` for a schema-defined field name."""
    return f"{field} in [{', '.join(literal(v) for v in values)}]"


class SearchFilter(BaseModel):
    """Restrictions on search results; every part is optional and ANDed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classifications: list[Classification] | None = Field(None, min_length=1)
    sources: list[str] | None = Field(None, min_length=1, max_length=100)
    doc_ids: list[str] | None = Field(None, min_length=1, max_length=1000)
    metadata: dict[str, Scalar] | None = None

    @field_validator("sources", "doc_ids")
    @classmethod
    def _no_control(cls, values: list[str] | None) -> list[str] | None:
        for v in values or ():
            literal(v)
        return values

    @field_validator("metadata")
    @classmethod
    def _keys(cls, meta: dict[str, Scalar] | None) -> dict[str, Scalar] | None:
        for key, value in (meta or {}).items():
            if not _KEY.match(key):
                raise ValueError(f"metadata key {key!r} must be an identifier (letters, digits, _; max 64)")
            literal(value)
        return meta

    def expression(self) -> str:
        parts: list[str] = []
        if self.classifications:
            parts.append(in_list(schema.CLASSIFICATION, [c.value for c in self.classifications]))
        if self.sources:
            parts.append(in_list(schema.SOURCE, self.sources))
        if self.doc_ids:
            parts.append(in_list(schema.DOC_ID, self.doc_ids))
        for key, value in (self.metadata or {}).items():
            parts.append(f'{schema.METADATA}["{key}"] == {literal(value)}')
        return " and ".join(f"({p})" for p in parts)
