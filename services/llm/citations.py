"""Which passages an answer actually cites.

The prompt numbers its passages ``[1]..[n]``; a model's answer cites them with markers
(``[2]``, ``[1, 3]``, ``[1][3]``). Only passages the answer cites are returned as
citations, in the order the answer first cites them, keeping the prompt's numbers so the
markers in the text still match. A marker that points to no passage is reported, not
dropped silently. Where the answer quotes a passage (``"..."`` / ``“...”``, a few words at
least), the quoted span is returned with the citation so a reader can check it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from services.kb.models import Citation, Hit

_MARKER = re.compile(r"\[\s*([0-9]+(?:\s*[,;]\s*[0-9]+)*)\s*\]")  # ASCII digits only
_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)
_QUOTE = re.compile(r"\"([^\"\n]{12,600})\"|“([^”\n]{12,600})”")
MIN_QUOTE_WORDS = 3


@dataclass(frozen=True)
class Cited:
    citations: list[Citation]
    quotes: dict[int, str]
    """Passage number -> the span of it the answer quotes."""
    unknown: list[int]
    """Markers in the answer that point to no passage in the prompt."""


def markers(text: str) -> list[int]:
    """The passage numbers ``text`` cites, in order of first mention."""
    seen: list[int] = []
    for m in _MARKER.finditer(_CODE.sub(" ", text)):  # arr[2] in code cites nothing
        for part in re.split(r"\s*[,;]\s*", m.group(1)):
            n = int(part)
            if n not in seen:
                seen.append(n)
    return seen


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def resolve(answer: str, hits: Sequence[Hit], all_cited: Sequence[Citation]) -> Cited:
    """The citations of ``answer``: ``all_cited`` is one citation per prompt passage (n = 1..)."""
    by_n = {c.n: c for c in all_cited}
    numbers = markers(answer)
    cited = [by_n[n] for n in numbers if n in by_n]
    unknown = [n for n in numbers if n not in by_n]
    texts = {n: _norm(hits[n - 1].chunk.text) for n in by_n if 0 < n <= len(hits)}
    quotes: dict[int, str] = {}
    for m in _QUOTE.finditer(answer):
        span = (m.group(1) or m.group(2)).strip()
        if len(span.split()) < MIN_QUOTE_WORDS:
            continue
        wanted = _norm(span.strip(" .,;:"))
        for c in cited:
            if c.n not in quotes and wanted in texts.get(c.n, ""):
                quotes[c.n] = span
                break
    return Cited(citations=[replace(c) for c in cited], quotes=quotes, unknown=unknown)
