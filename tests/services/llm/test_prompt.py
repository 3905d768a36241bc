"""Prompt building: passages in rank order within the budget, numbered as cited."""

from __future__ import annotations

import pytest

from services.kb.classification import Classification
from services.kb.models import Chunk, Hit
from services.llm.prompt import PromptTooLong, Turn, approx_tokens, build_prompt


def _hit(n: int, words: int) -> Hit:
    text = " ".join(f"w{n}x{i}." if i % 12 == 11 else f"w{n}x{i}" for i in range(words))
    chunk = Chunk(
        id=f"c{n}",
        doc_id=f"d{n}",
        version="v",
        chunk_no=0,
        text=text,
        classification=Classification.INTERNAL,
        source=f"src{n}.md",
        page=0,
        metadata={"title": f"Doc {n}", "sections": ["Intro"]},
    )
    return Hit(chunk=chunk, score=1.0 - n / 10)


def test_passages_are_numbered_in_rank_order() -> None:
    prompt = build_prompt("SYS", "What?", [_hit(1, 20), _hit(2, 20)], context_budget=1000, max_tokens=2000)
    assert prompt.text.index("[1] (Doc 1, src1.md, Intro)") < prompt.text.index("[2] (Doc 2, src2.md, Intro)")
    assert prompt.text.startswith("SYS\n\nContext:\n") and prompt.text.endswith("User: What?\nAssistant:")
    assert [h.chunk.id for h in prompt.hits] == ["c1", "c2"]
    assert prompt.tokens == approx_tokens(prompt.text)


def test_budget_drops_lower_ranked_passages() -> None:
    hits = [_hit(1, 100), _hit(2, 100), _hit(3, 100)]
    prompt = build_prompt("SYS", "Q?", hits, context_budget=300, max_tokens=4000)
    assert [h.chunk.id for h in prompt.hits] == ["c1"]
    assert "w2x0" not in prompt.text


def test_first_passage_is_cut_rather_than_dropped() -> None:
    prompt = build_prompt("SYS", "Q?", [_hit(1, 2000)], context_budget=300, max_tokens=4000)
    assert [h.chunk.id for h in prompt.hits] == ["c1"] and prompt.text.count(" ...\n") == 1
    assert prompt.tokens < 400


def test_history_is_kept_and_too_long_is_refused() -> None:
    history = [Turn("user", "Hi"), Turn("assistant", "Hello")]
    prompt = build_prompt("SYS", "Next?", [], context_budget=100, max_tokens=1000, history=history)
    assert "User: Hi\nAssistant: Hello\nUser: Next?\nAssistant:" in prompt.text
    with pytest.raises(PromptTooLong, match="the limit is 500"):
        build_prompt("SYS", "x" * 4000, [], context_budget=100, max_tokens=500)
