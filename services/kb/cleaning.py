"""Text cleaning shared by every loader.

Extracted text is noisy in predictable ways: hard-wrapped lines, words
hyphenated across line breaks, and running headers/footers on every page of a
PDF. Cleaning happens before chunking so that chunk ids depend on content, not
on layout accidents.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

_HYPHEN_BREAK = re.compile(r"(\w)-[ \t]*\n[ \t]*([a-z])")
_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200b\u3000]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_PAGE_NUMBER = re.compile(
    r"^\s*[-\u2013]?\s*(page\s+)?\d{1,4}(\s*(of|/)\s*\d{1,4})?\s*[-\u2013]?\s*$", re.IGNORECASE
)
_CONTROL = dict.fromkeys(c for c in range(32) if c not in (9, 10, 13))
INVISIBLE = "\u00ad\u034f\u180e\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\ufeff"
"""Characters that render as nothing (soft hyphen, zero-width, word joiner, BOM): dropped from
stored text as from questions, so a code is stored as it reads."""
DASHES = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"
"""Hyphens and dashes NFKC leaves alone: a code written with one of them is the same code."""
_DROPPED = {**_CONTROL, **dict.fromkeys(map(ord, INVISIBLE))}


def clean_text(text: str) -> str:
    """Normalise unicode and whitespace, join hyphenated line breaks, unwrap
    hard-wrapped lines inside paragraphs, keep paragraph breaks."""
    text = unicodedata.normalize("NFKC", text).translate(_DROPPED)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _HYPHEN_BREAK.sub(r"\1\2", text)
    text = _SPACES.sub(" ", text)
    paragraphs = [p for p in re.split(r"\n\s*\n", text)]
    out = []
    for para in paragraphs:
        lines = [ln.strip() for ln in para.split("\n")]
        lines = [ln for ln in lines if ln]
        if not lines:
            continue
        if all(_is_list_item(ln) for ln in lines[1:]) and len(lines) > 1:
            out.append("\n".join(lines))
        else:
            out.append(" ".join(lines))
    return _MANY_NEWLINES.sub("\n\n", "\n\n".join(out)).strip()


def _is_list_item(line: str) -> bool:
    return bool(re.match(r"^([-*\u2022]|\d+[.)])\s", line))


def _signature(line: str) -> str:
    """Lines compare case- and space-insensitively; varying page numbers are
    handled by ``_PAGE_NUMBER`` rather than by folding digits, which would make
    'Step 1 ...' on page 1 look like 'Step 2 ...' on page 2."""
    return " ".join(line.lower().split())


def strip_repeated_lines(pages: Sequence[str], edge: int = 3, min_share: float = 0.5) -> list[str]:
    """Remove running headers/footers: lines among the first/last ``edge`` lines
    of a page that recur verbatim on at least ``min_share`` of the pages (and on
    at least 2 pages), plus page numbers ('7', 'Page 7 of 9') at the edges."""
    split = [p.split("\n") for p in pages]
    if len(split) < 2:
        return [_drop_edge_page_numbers(lines, edge) for lines in split]
    counts: Counter[str] = Counter()
    for lines in split:
        edges = {_signature(ln) for ln in _edges(lines, edge) if ln.strip()}
        counts.update(edges)
    threshold = max(2, int(len(split) * min_share + 0.999))
    boiler = {sig for sig, n in counts.items() if n >= threshold}
    cleaned = []
    for lines in split:
        keep = []
        n = len(lines)
        for i, ln in enumerate(lines):
            at_edge = i < edge or i >= n - edge
            if at_edge and (_signature(ln) in boiler or _PAGE_NUMBER.match(ln)):
                continue
            keep.append(ln)
        cleaned.append("\n".join(keep))
    return cleaned


def _edges(lines: list[str], edge: int) -> list[str]:
    return lines[:edge] + lines[-edge:] if len(lines) > 2 * edge else lines


def _drop_edge_page_numbers(lines: list[str], edge: int) -> str:
    n = len(lines)
    return "\n".join(
        ln for i, ln in enumerate(lines) if not ((i < edge or i >= n - edge) and _PAGE_NUMBER.match(ln))
    )
