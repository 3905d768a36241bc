"""Cleaning and chunking: pure functions, checked on crafted and real text."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from services.config import ChunkingSettings
from services.kb.chunker import chunk_blocks, split_sentences
from services.kb.cleaning import clean_text, strip_repeated_lines
from services.kb.models import Block


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


CFG = ChunkingSettings(min_words=200, max_words=500, overlap_words=40)


def test_chunks_respect_bounds_and_never_cut_sentences() -> None:
    text = _sentences(300)
    chunks = chunk_blocks([Block(text)], CFG)
    assert len(chunks) > 3
    sentences = set(split_sentences(text))
    for c in chunks:
        words = len(c.text.split())
        assert words <= CFG.max_words
        for s in split_sentences(c.text):
            assert s in sentences, f"cut sentence: {s[:40]}"
    for c in chunks[:-1]:
        assert len(c.text.split()) >= CFG.min_words


def test_overlap_repeats_trailing_sentences() -> None:
    chunks = chunk_blocks([Block(_sentences(200))], CFG)
    for a, b in itertools.pairwise(chunks):
        last = split_sentences(a.text)[-1]
        assert b.text.startswith(last) or last in b.text[: 40 * 12]
        first_b = split_sentences(b.text)[0]
        assert first_b in a.text  # the first sentence of b is carried over from a


def test_overlong_sentence_is_split_by_words() -> None:
    sentence = " ".join(f"w{i}" for i in range(1200)) + "."
    chunks = chunk_blocks([Block(sentence)], CFG)
    assert [len(c.text.split()) for c in chunks] == [500, 500, 200]


def test_chunking_is_deterministic_and_tracks_pages_and_sections() -> None:
    blocks = [
        Block(_sentences(30), page=1, section="Intro"),
        Block(_sentences(30), page=2, section="Intro"),
        Block(_sentences(30), page=3, section="Costs"),
    ]
    a = chunk_blocks(blocks, CFG)
    b = chunk_blocks(blocks, CFG)
    assert a == b
    assert a[0].page == 1 and a[0].section == "Intro"
    assert a[-1].page_end == 3
    # a section change closes a chunk once it has min_words
    assert any(c.section == "Costs" and c.page == 3 for c in a)


def test_ten_megabyte_single_line_is_chunked_within_limits() -> None:
    line = ("lorem ipsum dolor sit amet consectetur " * 300_000)[: 10 * 1024 * 1024]
    assert "\n" not in line
    chunks = chunk_blocks([Block(line)], CFG)
    assert sum(len(c.text.split()) for c in chunks) >= len(line.split())
    assert all(len(c.text.split()) <= CFG.max_words and len(c.text) <= CFG.max_chars for c in chunks)


def test_giant_word_is_cut_by_characters() -> None:
    chunks = chunk_blocks([Block("x" * 50_000)], CFG)
    assert all(len(c.text) <= CFG.max_chars for c in chunks)
    assert "".join(c.text for c in chunks) == "x" * 50_000


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"min_words": 600, "max_words": 500}, "min_words (600) must be <= max_words (500)"),
        ({"min_words": 100, "overlap_words": 100}, "overlap_words (100) must be < min_words (100)"),
    ],
)
def test_chunking_settings_are_validated(kwargs: dict, needle: str) -> None:
    from services.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_settings(chunking=kwargs)


def test_same_content_same_chunk_texts_hash() -> None:
    text = _sentences(120)
    h1 = hashlib.sha256("".join(c.text for c in chunk_blocks([Block(text)], CFG)).encode()).hexdigest()
    h2 = hashlib.sha256("".join(c.text for c in chunk_blocks([Block(text)], CFG)).encode()).hexdigest()
    assert h1 == h2
