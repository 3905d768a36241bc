"""Sentence-aware chunking, sized in the embedding model's own tokens.

A chunk is whole sentences whose tokens, with the title/section head embedded in front of
them, fit the embedder's window (``chunking.max_tokens``, at most what the model reads):
no chunk text is ever past the window, so dense search sees all of it. A sentence is cut
only when it alone does not fit (between words, or between the pieces of one giant word),
or when it exceeds the character cap that keeps a chunk inside Milvus' VARCHAR limit.
Consecutive chunks share up to ``overlap_tokens`` of trailing sentences, so an answer that
straddles a boundary is still retrievable. The work is linear in the input: a 10 MB single
line is split in one pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from services.config import ChunkingSettings
from services.kb.models import Block, ChunkDraft
from services.kb.tokens import TokenWindow, embedding_input

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
    tokens: int
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


Head = Callable[[str | None], str]
"""The head embedded in front of a chunk of a given section (``tokens.embedding_head``)."""


def _no_head(section: str | None) -> str:
    return ""


class _Budget:
    """Tokens a chunk's own text may take: the window less its section's head."""

    def __init__(self, cfg: ChunkingSettings, window: TokenWindow, head: Head) -> None:
        self.cfg, self.window, self.head = cfg, window, head
        self.total = min(cfg.max_tokens or window.window, window.window)
        self._limits: dict[str | None, int] = {}

    def limit(self, section: str | None) -> int:
        if section not in self._limits:
            used = self.window.count([embedding_input(self.head(section), "")])[0]
            if self.total - used < 16:
                raise ValueError(
                    f"the embedded head {self.head(section)!r} leaves {self.total - used} of "
                    f"{self.total} tokens for the text (chunking.max_tokens or the model's window)"
                )
            self._limits[section] = self.total - used
        return self._limits[section]


def _units(blocks: Iterable[Block], cfg: ChunkingSettings, budget: _Budget) -> list[_Unit]:
    """Sentences (cut where one alone does not fit), with their token counts: counted in
    one batch, since the tokenizer is fast on many texts at once."""
    pieces = [
        (piece, block.page, block.section)
        for block in blocks
        for paragraph in block.text.split("\n")
        for sentence in split_sentences(paragraph)
        for piece in _cut_chars(sentence, cfg.max_chars)
    ]
    counts = budget.window.count([p for p, _, _ in pieces])
    units: list[_Unit] = []
    for (piece, page, section), tokens in zip(pieces, counts, strict=True):
        limit = budget.limit(section)
        if tokens <= limit:
            units.append(_Unit(piece, tokens, page, section))
            continue
        parts = [p for p in budget.window.cut(piece, limit) if p.strip()]
        for part, n in zip(parts, budget.window.count(parts), strict=True):
            units.append(_Unit(part, n, page, section))
    return units


def _cut_chars(sentence: str, max_chars: int) -> Iterator[str]:
    """Split a sentence over ``max_chars`` between words, and over-long words by characters."""
    if len(sentence) <= max_chars:
        yield sentence
        return
    piece: list[str] = []
    chars = 0
    for word in sentence.split():
        while len(word) > max_chars:
            if piece:
                yield " ".join(piece)
                piece, chars = [], 0
            yield word[:max_chars]
            word = word[max_chars:]
        if piece and chars + len(word) + 1 > max_chars:
            yield " ".join(piece)
            piece, chars = [], 0
        piece.append(word)
        chars += len(word) + 1
    if piece:
        yield " ".join(piece)


def chunk_blocks(
    blocks: Iterable[Block], cfg: ChunkingSettings, window: TokenWindow, head: Head = _no_head
) -> list[ChunkDraft]:
    """Group sentences into chunks that fit ``window`` with their ``head``; prefer to close a
    chunk at a section change once it has reached ``min_tokens``."""
    budget = _Budget(cfg, window, head)
    chunks: list[ChunkDraft] = []
    current: list[_Unit] = []
    tokens = chars = 0

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

    for unit in _units(blocks, cfg, budget):
        if current:
            limit = budget.limit(current[0].section)
            too_big = tokens + unit.tokens > limit or chars + len(unit.text) + 1 > cfg.max_chars
            new_section = unit.section != current[-1].section and tokens >= cfg.min_tokens
            if too_big or new_section:
                emit()
                current = [] if new_section else _overlap(current, unit, cfg, budget)
                tokens = sum(u.tokens for u in current)
                chars = sum(len(u.text) + 1 for u in current)
        current.append(unit)
        tokens += unit.tokens
        chars += len(unit.text) + 1
    if current:
        emit()
    return _verified(chunks, budget)


def _verified(chunks: list[ChunkDraft], budget: _Budget, rounds: int = 3) -> list[ChunkDraft]:
    """Count each chunk as the model will read it; a tokenizer whose counts do not add up
    across a join (some BPE vocabularies) may push one over: such a chunk is cut again."""
    counts = budget.window.count([embedding_input(budget.head(c.section), c.text) for c in chunks])
    if all(n <= budget.total for n in counts):
        return chunks
    if not rounds:
        raise ValueError(
            f"chunks still exceed {budget.total} tokens after re-cutting: the tokenizer is erratic"
        )
    out: list[ChunkDraft] = []
    for chunk, n in zip(chunks, counts, strict=True):
        if n <= budget.total:
            out.append(chunk)
            continue
        limit = max(1, budget.limit(chunk.section) - 2 * (n - budget.total))
        out.extend(_replace_text(chunk, part) for part in budget.window.cut(chunk.text, limit))
    return _verified(out, budget, rounds - 1)


def _replace_text(chunk: ChunkDraft, text: str) -> ChunkDraft:
    return ChunkDraft(text, chunk.page, chunk.section, chunk.page_end, chunk.sections)


def _overlap(previous: list[_Unit], nxt: _Unit, cfg: ChunkingSettings, budget: _Budget) -> list[_Unit]:
    """Trailing whole sentences of ``previous`` worth at most ``overlap_tokens``,
    dropped if they would push the next chunk over its limits."""
    tail: list[_Unit] = []
    tokens = 0
    for unit in reversed(previous):
        if tokens + unit.tokens > cfg.overlap_tokens:
            break
        tail.insert(0, unit)
        tokens += unit.tokens
    if tail and len(tail) == len(previous):
        tail = tail[1:]  # never repeat a whole chunk
    if not tail:
        return []
    tokens = sum(u.tokens for u in tail)
    chars = sum(len(u.text) + 1 for u in tail)
    if tokens + nxt.tokens > budget.limit(tail[0].section) or chars + len(nxt.text) + 1 > cfg.max_chars:
        return []
    return tail
