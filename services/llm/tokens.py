"""Counting prompt tokens with the served model's own tokenizer.

The prompt budget (how many passages fit) is only as good as its token counts, and a
CJK passage or code costs several times what ``len(text) / 4`` says. So an endpoint
names its tokenizer (``tokenizer``): a Hugging Face tokenizer directory -- the one in the
model repository, which Triton's preprocessing uses -- or the GGUF file llama.cpp serves
(its header carries the vocabulary and the chat template). Conversations are counted
through the model's chat template, special tokens and all. Without a tokenizer the
count is the approximation, and every answer says so (``usage.prompt_tokens_exact``).

Special-token strings written inside documents or questions (DeepSeek's ``User`` marker,
``<|im_start|>``, ``</think>``) would become real control tokens once a template is
applied and the text tokenised: :func:`neutralise` breaks each one with a word joiner
(U+2060), so the model reads the characters but never the control token.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4
"""Approximate tokens a chat template adds per message (role markers, separators)."""
WORD_JOINER = "\u2060"
# control-token shapes of the common families, broken even when no tokenizer is configured
BAR = "\uff5c"  # DeepSeek's special tokens use the fullwidth vertical line
_GENERIC = re.compile(
    rf"<{BAR}[^{BAR}<>\n]{{1,64}}{BAR}>|<\|[A-Za-z0-9_]{{1,64}}\|>|</?think>|</?s>|\[/?INST\]"
    r"|</?(?:start_of_turn|end_of_turn|bos|eos|pad|tool_call|tool_response)>"
)


class TokenizerError(ValueError):
    """The configured tokenizer cannot be loaded; the message names the path and why."""


def neutralise(text: str, specials: Iterable[str] = ()) -> str:
    """``text`` with every special-token string broken so it tokenises as plain text."""

    def brk(token: str) -> str:
        return token[0] + WORD_JOINER + token[1:]

    for token in sorted({t for t in specials if len(t) > 1}, key=len, reverse=True):
        if token in text:
            text = text.replace(token, brk(token))
    return _GENERIC.sub(lambda m: brk(m.group(0)), text)


class TokenCounter(Protocol):
    exact: bool
    source: str
    specials: frozenset[str]

    def count(self, text: str) -> int: ...

    def count_messages(self, messages: Sequence[dict[str, str]]) -> int: ...

    def opens_reasoning(self) -> bool: ...


class ApproxCounter:
    """~4 characters a token (English); used only where no tokenizer is configured."""

    exact = False
    source = "approximation (~4 characters per token; set the endpoint's tokenizer for exact counts)"
    specials: frozenset[str] = frozenset()

    def count(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def count_messages(self, messages: Sequence[dict[str, str]]) -> int:
        return sum(self.count(m["content"]) + MESSAGE_OVERHEAD for m in messages) + MESSAGE_OVERHEAD

    def opens_reasoning(self) -> bool:
        return False


class ModelTokenizer:
    """The served model's tokenizer, from a tokenizer directory or a GGUF file's header."""

    exact = True

    def __init__(self, path: Path) -> None:
        self.source = str(path)
        self._tok = _load(path)

    @cached_property
    def specials(self) -> frozenset[str]:  # type: ignore[override]
        """Every added token: control tokens and the ones (``<think>``) templates rely on."""
        added = getattr(self._tok, "added_tokens_decoder", {}) or {}
        names = {str(t) for t in getattr(self._tok, "all_special_tokens", [])}
        names |= {getattr(t, "content", str(t)) for t in added.values()}
        return frozenset(n for n in names if n and not n.isspace())

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False))

    def render(self, messages: Sequence[dict[str, str]]) -> str | None:
        """The prompt text the model's chat template makes of ``messages`` (None: no template)."""
        if not getattr(self._tok, "chat_template", None):
            return None
        try:
            return str(
                self._tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            )
        except Exception as exc:  # jinja errors: the template refuses these messages
            raise TokenizerError(f"{self.source}: the chat template failed: {exc}") from None

    def count_messages(self, messages: Sequence[dict[str, str]]) -> int:
        rendered = self.render(messages)
        if rendered is None:
            return sum(self.count(m["content"]) + MESSAGE_OVERHEAD for m in messages)
        # the template writes BOS itself where the model wants one
        return len(self._tok.encode(rendered, add_special_tokens=False))

    def opens_reasoning(self) -> bool:
        """Whether the template's generation prompt already opens ``<think>`` (DeepSeek-R1)."""
        rendered = self.render([{"role": "user", "content": "ping"}])
        return bool(rendered) and rendered.rstrip().endswith("<think>")


GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4
"""llama.cpp's token types: control tokens (DeepSeek's role markers) and user-defined ones (``<think>``)."""


def _from_gguf(path: Path) -> Any:
    """A fast tokenizer from a GGUF header alone (a file whose weights are not all there loads too).

    Hugging Face's converter builds the vocabulary and merges but leaves out some of llama.cpp's
    control and user-defined tokens (DeepSeek's role markers among them): in a byte-level BPE
    vocabulary they are put back at their own ids, so each is the one token the model sees and
    the ids match the model's; elsewhere they are added (each still counts as one token).
    The chat template comes from ``tokenizer.chat_template``.
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, vocab, config = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(architecture, vocab)
    spec = json.loads(backend.to_str())
    known = {t["id"] for t in spec.get("added_tokens", [])}
    model_vocab = spec["model"].get("vocab")
    by_id = {i: t for t, i in model_vocab.items()} if isinstance(model_vocab, dict) else {}
    missing = [
        (token_id, token, kind)
        for token_id, (token, kind) in enumerate(
            zip(vocab["tokens"], vocab.get("token_type") or [], strict=False)
        )
        if kind in (GGUF_CONTROL, GGUF_USER_DEFINED) and token_id not in known
    ]
    settings = {k: v for k, v in config.items() if v is not None}
    if not missing:
        return PreTrainedTokenizerFast(tokenizer_object=backend, **settings)
    if spec["model"].get("type") != "BPE" or not by_id or not _byte_level(spec):
        # a sentencepiece-style vocabulary (Gemma): each control token counts as one, at a new id
        backend.add_tokens(
            [AddedToken(token, special=kind == GGUF_CONTROL, normalized=False) for _, token, kind in missing]
        )
        return PreTrainedTokenizerFast(tokenizer_object=backend, **settings)
    for token_id, token, kind in missing:
        # the converter byte-encoded the control token's text: it is the token itself, at its id
        model_vocab.pop(by_id.get(token_id, token), None)
        model_vocab[token] = token_id
        spec["added_tokens"].append(
            {
                "id": token_id,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": kind == GGUF_CONTROL,
            }
        )
    spec["added_tokens"].sort(key=lambda t: t["id"])
    fixed = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=fixed, **settings)


def _byte_level(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer is byte-level BPE (GPT-2 style: Qwen, DeepSeek, Llama 3)."""
    return "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))


def _load(path: Path) -> Any:
    from transformers import AutoTokenizer  # heavy: imported only when a tokenizer is configured

    if not path.exists():
        raise TokenizerError(f"{path}: no such tokenizer (a tokenizer directory or a .gguf file)")
    try:
        if path.is_file():
            with path.open("rb") as f:
                if f.read(4) != b"GGUF":
                    raise TokenizerError(f"{path}: not a GGUF file (no GGUF magic bytes)")
            return _from_gguf(path)
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise TokenizerError(f"{path}: no tokenizer.json or tokenizer_config.json in this directory")
        return AutoTokenizer.from_pretrained(str(path))
    except TokenizerError:
        raise
    except Exception as exc:
        raise TokenizerError(f"{path}: cannot load the tokenizer: {type(exc).__name__}: {exc}") from None


def counter_for(path: Path | None) -> TokenCounter:
    """The counter for an endpoint's ``tokenizer`` setting (the approximation when unset)."""
    if path is None:
        return ApproxCounter()
    counter = ModelTokenizer(path)
    log.info("prompt tokens counted by %s", path)
    return counter
