"""Prompts: system prompt, retrieved passages with citation numbers, the conversation.

Passages go in rank order until the context token budget is spent (a passage that
does not fit is cut at a sentence-ish boundary when it is the first, else
dropped), so the best evidence always survives truncation. Tokens are counted
approximately (:func:`approx_tokens`, ~4 characters per token for English): the
model's own preprocessing enforces its real limit and reports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from services.kb.models import Hit

CHARS_PER_TOKEN = 4


class PromptTooLong(ValueError):
    """The question (plus conversation) alone exceeds the prompt limit."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"the prompt needs about {tokens} tokens; the limit is {limit}")
        self.tokens, self.limit = tokens, limit


def approx_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Prompt:
    text: str
    hits: list[Hit]
    """The passages that made it into the prompt, numbered 1..n as cited."""
    tokens: int


def _label(n: int, hit: Hit) -> str:
    chunk = hit.chunk
    where = ", ".join(p for p in (chunk.metadata.get("title"), chunk.source, chunk.sections) if p)
    return f"[{n}] ({where})\n"


def build_prompt(
    system: str,
    question: str,
    hits: Sequence[Hit],
    *,
    context_budget: int,
    max_tokens: int,
    history: Sequence[Turn] = (),
) -> Prompt:
    """The prompt text; raises :class:`PromptTooLong` when even without context it is too long."""
    conversation = "".join(f"{'User' if t.role == 'user' else 'Assistant'}: {t.content}\n" for t in history)
    tail = f"\n{conversation}User: {question}\nAssistant:"
    fixed = f"{system}\n\nContext:\n"
    base = approx_tokens(fixed + tail)
    if base > max_tokens:
        raise PromptTooLong(base, max_tokens)
    budget = min(context_budget, max_tokens - base)
    used: list[Hit] = []
    parts: list[str] = []
    for hit in hits:
        label = _label(len(used) + 1, hit)
        block = label + hit.chunk.text.strip() + "\n"
        cost = approx_tokens(block)
        if cost > budget:
            room = (budget - approx_tokens(label)) * CHARS_PER_TOKEN
            if used or room < 200:
                break
            cut = hit.chunk.text[:room]
            block = label + cut[: max(cut.rfind(". ") + 1, room // 2)].strip() + " ...\n"
            cost = approx_tokens(block)
        parts.append(block)
        used.append(hit)
        budget -= cost
    text = fixed + ("".join(parts) or "(no passages found)\n") + tail
    return Prompt(text=text, hits=used, tokens=approx_tokens(text))
