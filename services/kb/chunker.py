"""Sentence-aware chunking.

Chunks are built from whole sentences between ``min_words`` and ``max_words``;
a sentence is only ever cut when it alone exceeds ``max_words`` (or the
character cap that keeps a chunk inside Milvus' VARCHAR limit). Consecutive
chunks share up to ``overlap_words`` of trailing sentences so an answer that
straddles a boundary is still retrievable. The work is linear in the input:
a 10 MB single line is split in one pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from services.config import ChunkingSettings
from services.kb.models import Block, ChunkDraft

_ABBREVIATIONS = frozenset(
    {
        "e.g",
        "i.e",
        "etc",
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "inc",
        "ltd",
        "co",
        "corp",
        "vs",
        "approx",
        "no",
        "fig",
        "st",
        "jr",
        "sr",
        "dept",
        "est",
        "gmbh",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
    }
)
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


@dataclass(frozen=True, slots=True)
class _Unit:
    text: str
    words: int
    page: int | None
    section: str | None


def split_sentences(paragraph: str) -> list[str]:
    """Split on ., ! or ? followed by space and a capital/digit, except after
    common abbreviations and single initials."""
    out: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(paragraph):
        candidate = paragraph[start : match.start()].rstrip()
        last = candidate.rsplit(None, 1)[-1].rstrip(".!?\"')]").lower() if candidate else ""
        if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
            continue
        out.append(paragraph[start : match.end()].strip())
        start = match.end()
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return out


def _units(blocks: Iterable[Block], cfg: ChunkingSettings) -> Iterator[_Unit]:
    for block in blocks:
        for paragraph in block.text.split("\n"):
            for sentence in split_sentences(paragraph):
                for piece in _cut(sentence, cfg):
                    yield _Unit(piece, len(piece.split()), block.page, block.section)


def _cut(sentence: str, cfg: ChunkingSettings) -> Iterator[str]:
    """Split an over-long sentence into word windows, and over-long words by characters."""
    words = sentence.split()
    if len(words) <= cfg.max_words and len(sentence) <= cfg.max_chars:
        yield sentence
        return
    piece: list[str] = []
    chars = 0
    for word in words:
        while len(word) > cfg.max_chars:
            if piece:
                yield " ".join(piece)
                piece, chars = [], 0
            yield word[: cfg.max_chars]
            word = word[cfg.max_chars :]
        if piece and (len(piece) >= cfg.max_words or chars + len(word) + 1 > cfg.max_chars):
            yield " ".join(piece)
            piece, chars = [], 0
        piece.append(word)
        chars += len(word) + 1
    if piece:
        yield " ".join(piece)


def chunk_blocks(blocks: Iterable[Block], cfg: ChunkingSettings) -> list[ChunkDraft]:
    """Group sentences into chunks; prefer to close a chunk at a section change
    once it has reached ``min_words``."""
    chunks: list[ChunkDraft] = []
    current: list[_Unit] = []
    words = chars = 0

    def emit() -> None:
        chunks.append(
            ChunkDraft(
                text=" ".join(u.text for u in current),
                page=current[0].page,
                section=current[0].section,
                page_end=current[-1].page,
                sections=tuple(dict.fromkeys(u.section for u in current if u.section)),
            )
        )

    for unit in _units(blocks, cfg):
        if current:
            too_big = words + unit.words > cfg.max_words or chars + len(unit.text) + 1 > cfg.max_chars
            new_section = unit.section != current[-1].section and words >= cfg.min_words
            if too_big or new_section:
                emit()
                current = [] if new_section else _overlap(current, unit, cfg)
                words = sum(u.words for u in current)
                chars = sum(len(u.text) + 1 for u in current)
        current.append(unit)
        words += unit.words
        chars += len(unit.text) + 1
    if current:
        emit()
    return chunks


def _overlap(previous: list[_Unit], nxt: _Unit, cfg: ChunkingSettings) -> list[_Unit]:
    """Trailing whole sentences of ``previous`` worth at most ``overlap_words``,
    dropped if they would push the next chunk over its limits."""
    tail: list[_Unit] = []
    words = 0
    for unit in reversed(previous):
        if words + unit.words > cfg.overlap_words:
            break
        tail.insert(0, unit)
        words += unit.words
    if tail and len(tail) == len(previous):
        tail = tail[1:]  # never repeat a whole chunk
    words = sum(u.words for u in tail)
    chars = sum(len(u.text) + 1 for u in tail)
    if words + nxt.words > cfg.max_words or chars + len(nxt.text) + 1 > cfg.max_chars:
        return []
    return tail
