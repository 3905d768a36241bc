"""What the embedding model reads of a passage, counted in its own tokens.

A sentence-transformers model truncates its input at ``max_seq_length`` word pieces
(special tokens included): anything past that is never embedded, so dense search cannot
find it. The chunker therefore sizes chunks with the embedder's own tokenizer and window,
the embedded title/section head included (:func:`embedding_head`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

HEAD_CHARS = 100
"""The embedded title/section head is cut at this many characters, so a long title cannot
crowd a chunk's own text out of the window."""


def embedding_head(title: str, section: str | None) -> str:
    """The context embedded in front of a chunk's text: its title and section."""
    head = f"{title} - {section}" if section and section != title else title
    return head[:HEAD_CHARS]


def embedding_input(head: str, text: str) -> str:
    """Exactly what the model is given for a passage."""
    return f"{head}. {text}"


@dataclass(frozen=True)
class TokenWindow:
    """``window`` tokens of text (special tokens already subtracted) that the model reads,
    counted by ``tokenizer`` (a ``tokenizers.Tokenizer``)."""

    tokenizer: Any
    window: int

    @classmethod
    def of(cls, tokenizer: Any, max_seq_length: int) -> TokenWindow:
        """From a model's Hugging Face tokenizer. Counting uses a copy of its Rust tokenizer
        without truncation or padding: the model's own copy truncates once it has encoded."""
        from tokenizers import Tokenizer

        counting = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        counting.no_truncation()
        counting.no_padding()
        return cls(counting, max_seq_length - tokenizer.num_special_tokens_to_add(pair=False))

    def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text, without special tokens."""
        if not texts:
            return []
        return [len(e.ids) for e in self._encode(texts)]

    def cut(self, text: str, limit: int) -> Iterator[str]:
        """``text`` in consecutive pieces of at most ``limit`` tokens, cut between words where
        a word boundary is inside the piece (a single over-long word is cut between tokens)."""
        offsets = self._encode([text])[0].offsets
        start, n = 0, len(offsets)
        while start < n:
            end = min(n, start + limit)
            if end < n:  # step back to the last word boundary inside the piece
                for k in range(end, start, -1):
                    if offsets[k][0] > offsets[k - 1][1]:  # whitespace between tokens k-1 and k
                        end = k
                        break
            yield text[offsets[start][0] : offsets[end - 1][1]]
            start = end

    def _encode(self, texts: Sequence[str]) -> list[Any]:
        return list(self.tokenizer.encode_batch(list(texts), add_special_tokens=False))
