"""Classification labels and how a document gets one.

The LLM router and the knowledge sync decide what may leave the premises from
this label alone, so the resolution rule is deliberately conservative: every
source that states a label is considered and the *most restrictive* one wins.
A stray ``classification: public`` in front-matter can therefore never
downgrade a file that a sidecar, a path rule or the operator marked
confidential.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import NamedTuple


class Classification(StrEnum):
    """Sensitivity label carried by every document and chunk."""

    PUBLIC = "public"
    INTERNAL = "internal"
    CONFIDENTIAL = "confidential"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Classification.PUBLIC: 0, Classification.INTERNAL: 1, Classification.CONFIDENTIAL: 2}


class PathRule(NamedTuple):
    """A glob over the document's path (``/``-separated) and the label it implies."""

    pattern: str
    classification: Classification


def parse_label(value: object, where: str) -> Classification:
    """Parse a label from user input, naming ``where`` it came from on error."""
    try:
        return Classification(str(value).strip().lower())
    except ValueError:
        allowed = ", ".join(c.value for c in Classification)
        raise ValueError(f"{where}: classification {value!r} is not one of: {allowed}") from None


def labels_from_rules(path: str, rules: Sequence[PathRule]) -> list[Classification]:
    """Labels of every rule whose glob matches ``path`` or any trailing part of it,
    so ``confidential/*`` covers ``confidential/a.md`` and ``/srv/docs/confidential/a.md``
    alike, whichever folder an operator happened to ingest from."""
    return [r.classification for r in rules if path_matches(path, r.pattern)]


def path_matches(path: str, pattern: str) -> bool:
    """Whether the glob ``pattern`` matches ``path`` or any trailing part of it."""
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    return any(fnmatchcase("/".join(parts[i:]), pattern) for i in range(len(parts)))


def most_restrictive(labels: Iterable[Classification | None], default: Classification) -> Classification:
    """The highest-ranked label among those given, or ``default`` when none is given."""
    present = [label for label in labels if label is not None]
    if not present:
        return default
    return max(present, key=lambda c: c.rank)
