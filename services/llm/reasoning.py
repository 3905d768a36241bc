"""Separating a reasoning model's thinking from its answer, in a stream.

DeepSeek-R1 and its distills write ``<think>...</think>`` before the answer; their chat
template may already open the ``<think>`` in the prompt, so the output starts inside the
thinking and only the closing tag appears. Servers that separate it themselves send it as
``reasoning_content`` (DeepSeek's API convention) and never reach this splitter.

The splitter is fed raw text as it arrives and returns typed pieces; a tag split across
chunks (``</thi`` + ``nk>``) is held back until it is whole, so nothing of a tag ever
reaches the answer and nothing of the answer is held longer than a tag's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["reasoning", "content"]
OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of generated text: thinking (``reasoning``) or the answer (``content``)."""

    kind: Kind
    text: str


class UnterminatedReasoning(ValueError):
    """The model stopped while still thinking: there is no answer."""


def _held(text: str, tag: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """Incremental ``<think>`` / ``</think>`` splitter.

    ``opened=None``: unknown (no tokenizer, no setting): everything is held until the text
    shows it -- an opening ``<think>``, or a ``</think>`` with the thinking before it; a text
    that never closes a thought is all answer. Slower to stream, never a leak.

    ``opened``: the prompt already opened the thinking (the template ends with ``<think>``),
    so output is reasoning until ``</think>`` (a repeated ``<think>`` at the start is dropped).
    Otherwise an opening ``<think>`` is honoured only before any answer text (leading
    whitespace aside): a tag later in an answer is text.
    """

    def __init__(self, *, opened: bool | None = False) -> None:
        self.state: Literal["undecided", "start", "reasoning", "content"] = (
            "undecided" if opened is None else "start"
        )
        self.opened = bool(opened)
        self._buffer = ""
        self._lead = False  # just after </think>: the whitespace before the answer is dropped
        self.saw_reasoning = opened

    def feed(self, text: str) -> list[Delta]:
        self._buffer += text
        out: list[Delta] = []
        while self._buffer:
            if self.state == "undecided":
                # nobody knows whether the prompt opened <think>: hold until the text says
                if self._buffer.lstrip().startswith(OPEN) or OPEN.startswith(self._buffer.lstrip()):
                    if not self._buffer.lstrip().startswith(OPEN):
                        break
                    self.state = "start"
                    continue
                at = self._buffer.find(CLOSE)
                if at < 0:
                    break
                if at:
                    out.append(Delta("reasoning", self._buffer[:at]))
                self._buffer = self._buffer[at + len(CLOSE) :]
                self.state, self._lead, self.saw_reasoning = "content", True, True
                continue
            if self.state == "start":
                stripped = self._buffer.lstrip()
                if not stripped:
                    break  # only whitespace so far: it may precede <think>
                if stripped.startswith(OPEN):
                    self._buffer = stripped[len(OPEN) :]
                    self.state, self.saw_reasoning = "reasoning", True
                    continue
                if OPEN.startswith(stripped):
                    break  # "<thi": wait for the rest
                self.state = "reasoning" if self.opened else "content"
                continue
            if self.state == "reasoning":
                at = self._buffer.find(CLOSE)
                if at >= 0:
                    if at:
                        out.append(Delta("reasoning", self._buffer[:at]))
                    self._buffer = self._buffer[at + len(CLOSE) :]
                    self.state, self._lead = "content", True
                    continue
                keep = _held(self._buffer, CLOSE)
                ready = self._buffer[: len(self._buffer) - keep]
                if ready:
                    out.append(Delta("reasoning", ready))
                self._buffer = self._buffer[len(ready) :]
                break
            if self._lead:
                self._buffer = self._buffer.lstrip()
                if not self._buffer:
                    break
                self._lead = False
            out.append(Delta("content", self._buffer))
            self._buffer = ""
        return out

    def finish(self) -> list[Delta]:
        """The held-back rest; raises :class:`UnterminatedReasoning` if still thinking."""
        rest, self._buffer = self._buffer, ""
        if self.state == "undecided":  # it never closed a thought: all of it is the answer
            return [Delta("content", rest)] if rest.strip() else []
        if self.state == "reasoning" or (self.state == "start" and self.opened):
            raise UnterminatedReasoning("the model stopped while still reasoning (no </think>): no answer")
        if self.state == "start":
            return [Delta("content", rest)] if rest.strip() else []
        rest = rest.lstrip() if self._lead else rest
        return [Delta("content", rest)] if rest else []
