"""Cleaning and chunking: pure functions, checked on crafted and real text."""

from __future__ import annotations

import itertools
import re

import pytest

from services.config import ChunkingSettings
from services.kb.chunker import chunk_blocks, split_sentences
from services.kb.cleaning import clean_text, strip_repeated_lines
from services.kb.models import Block
from services.kb.tokens import TokenWindow, embedding_head, embedding_input


def test_clean_text_joins_hyphenation_and_unwraps_lines() -> None:
    raw = "The reim-\nbursement is paid\nwithin   ten days.\n\n\n\nNext\tparagraph."
    assert clean_text(raw) == "The reimbursement is paid within ten days.\n\nNext paragraph."


def test_clean_text_keeps_real_hyphens_and_lists() -> None:
    assert clean_text("A well-known fact.") == "A well-known fact."
    assert clean_text("Steps:\n- one\n- two") == "Steps: - one - two" or "- one\n- two" in clean_text(
        "Steps\n\n- one\n- two"
    )
    assert clean_text("- one\n- two") == "- one\n- two"


def test_strip_repeated_headers_and_page_numbers() -> None:
    pages = [
        f"ACME Policy Manual\nBody text of page {i} is unique.\nMore words here {i}.\nPage {i} of 3"
        for i in range(1, 4)
    ]
    cleaned = strip_repeated_lines(pages)
    for i, page in enumerate(cleaned, start=1):
        assert "ACME Policy Manual" not in page
        assert "Page" not in page
        assert f"Body text of page {i} is unique." in page


def test_split_sentences_respects_abbreviations() -> None:
    text = "Dr. Weiland approved it, e.g. for Q3. The budget is EUR 4.5 million. Done!"
    assert split_sentences(text) == [
        "Dr. Weiland approved it, e.g. for Q3.",
        "The budget is EUR 4.5 million.",
        "Done!",
    ]


def _sentences(n: int, words: int = 12) -> str:
    return " ".join(
        f"Sentence {i} " + " ".join(f"w{i}x{j}" for j in range(words - 3)) + " end." for i in range(n)
    )


CFG = ChunkingSettings(min_tokens=96, overlap_tokens=32)


@pytest.fixture(scope="module")
def window(embedder) -> TokenWindow:
    """The packaged model's real tokenizer and window (254 tokens of text)."""
    return embedder.window


def _tokens(window: TokenWindow, chunks, head=lambda s: "") -> list[int]:
    return window.count([embedding_input(head(c.section), c.text) for c in chunks])


def test_chunks_fit_the_window_and_never_cut_sentences(window: TokenWindow) -> None:
    text = _sentences(300)
    chunks = chunk_blocks([Block(text)], CFG, window)
    assert len(chunks) > 10
    assert max(_tokens(window, chunks)) <= window.window
    sentences = set(split_sentences(text))
    for c in chunks:
        for s in split_sentences(c.text):
            assert s in sentences, f"cut sentence: {s[:40]}"
    # full: the next sentence would not have fitted
    sentence_tokens = window.count([_sentences(1)])[0]
    assert all(n > window.window - sentence_tokens - 1 for n in _tokens(window, chunks)[:-1])


def test_the_head_counts_against_the_window(window: TokenWindow) -> None:
    title = "A rather long title for the travel and expense policy of the company"
    head = lambda s: embedding_head(title, s)  # noqa: E731
    blocks = [Block(_sentences(120), section="Reimbursement of international travel")]
    with_head = chunk_blocks(blocks, CFG, window, head)
    bare = chunk_blocks(blocks, CFG, window)
    assert len(with_head) > len(bare)
    assert max(_tokens(window, with_head, head)) <= window.window
    assert max(_tokens(window, bare, head)) > window.window  # sized without it, the head overflows


def test_max_tokens_lowers_the_window_but_never_raises_it(window: TokenWindow) -> None:
    small = chunk_blocks([Block(_sentences(100))], ChunkingSettings(max_tokens=128, min_tokens=64), window)
    assert max(_tokens(window, small)) <= 128
    big = chunk_blocks([Block(_sentences(100))], ChunkingSettings(max_tokens=4096), window)
    assert max(_tokens(window, big)) <= window.window


def test_overlap_repeats_trailing_sentences(window: TokenWindow) -> None:
    text = _sentences(200, words=5)
    assert window.count([split_sentences(text)[7]])[0] < CFG.overlap_tokens  # short enough to repeat
    chunks = chunk_blocks([Block(text)], CFG, window)
    assert len(chunks) > 3
    for a, b in itertools.pairwise(chunks):
        first_b = split_sentences(b.text)[0]
        assert first_b in a.text  # the first sentence of b is carried over from a
        assert window.count([first_b])[0] <= CFG.overlap_tokens


def test_overlong_sentence_is_split_between_words(window: TokenWindow) -> None:
    sentence = " ".join(f"w{i}" for i in range(1200)) + "."
    chunks = chunk_blocks([Block(sentence)], CFG, window)
    assert len(chunks) > 4 and max(_tokens(window, chunks)) <= window.window
    assert " ".join(c.text for c in chunks) == sentence  # every word, in order, none cut


def test_chunking_is_deterministic_and_tracks_pages_and_sections(window: TokenWindow) -> None:
    blocks = [
        Block(_sentences(30), page=1, section="Intro"),
        Block(_sentences(30), page=2, section="Intro"),
        Block(_sentences(30), page=3, section="Costs"),
    ]
    a = chunk_blocks(blocks, CFG, window)
    b = chunk_blocks(blocks, CFG, window)
    assert a == b
    assert a[0].page == 1 and a[0].section == "Intro"
    assert a[-1].page_end == 3
    # a section change closes a chunk once it has min_tokens
    assert any(c.section == "Costs" and c.page == 3 and c.text.startswith("Sentence 0 ") for c in a)


def test_ten_megabyte_single_line_is_chunked_within_limits(window: TokenWindow) -> None:
    line = ("lorem ipsum dolor sit amet consectetur " * 300_000)[: 10 * 1024 * 1024]
    assert "\n" not in line
    chunks = chunk_blocks([Block(line)], CFG, window)
    assert sum(len(c.text.split()) for c in chunks) >= len(line.split())
    assert all(len(c.text) <= CFG.max_chars for c in chunks)
    assert max(_tokens(window, chunks)) <= window.window


def test_one_twenty_thousand_character_sentence(window: TokenWindow) -> None:
    sentence = ("Clause " + " and ".join(f"party{i} agrees" for i in range(1500)))[:20_000]
    chunks = chunk_blocks([Block(sentence)], CFG, window)
    assert max(_tokens(window, chunks)) <= window.window
    assert " ".join(c.text for c in chunks) == sentence


def test_giant_word_is_cut_by_characters(window: TokenWindow) -> None:
    chunks = chunk_blocks([Block("x" * 50_000)], CFG, window)
    assert all(len(c.text) <= CFG.max_chars for c in chunks)
    assert "".join(c.text for c in chunks) == "x" * 50_000
    digits = "".join(str(i % 10) for i in range(5_000))  # many tokens, no space to cut at
    chunks = chunk_blocks([Block(digits)], CFG, window)
    assert "".join(c.text for c in chunks) == digits and max(_tokens(window, chunks)) <= window.window


def test_hostile_text_is_chunked_within_the_window(window: TokenWindow) -> None:
    text = "\u202eevil\u202c " * 300 + "\x07\x1b[31m " * 200 + "\u0645\u0631\u062d\u0628\u0627 " * 400
    chunks = chunk_blocks([Block(text)], CFG, window)
    assert chunks and max(_tokens(window, chunks)) <= window.window


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"min_tokens": 300, "max_tokens": 200}, "min_tokens (300) must be <= max_tokens (200)"),
        ({"min_tokens": 100, "overlap_tokens": 100}, "overlap_tokens (100) must be < min_tokens (100)"),
        (
            {"max_words": 500},
            "chunking.max_words = 500: chunks are sized in the embedding model's tokens; "
            "set chunking.max_tokens",
        ),
        ({"max_tokens": 64}, "max_tokens"),
    ],
)
def test_chunking_settings_are_validated(kwargs: dict, needle: str) -> None:
    from services.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_settings(chunking=kwargs)
